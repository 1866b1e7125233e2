"""Checkpoints that load anywhere: generated self-contained remote code with auto_map, cartesia's layout
through the Auto classes, generation_config.json carried from the teacher, a model card."""

import ast
import json
import os
import subprocess
import sys

import torch
from conftest import make_checkpoint, random_model, tiny_llamba_config
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
from transformers.dynamic_module_utils import get_imports

from llamba.checkpoints import load_model, record_distillation, save_cartesia
from llamba.remote_code import AUTO_MAP, CONFIG_FILE, MODELING_FILE, remote_code_files

# Runs with the llamba package made unimportable: only torch and transformers are available.
REMOTE_PROBE = r"""
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "llamba" or name.startswith("llamba."):
            raise ImportError("llamba is not installed here")
sys.meta_path.insert(0, Block())
import torch
from transformers import AutoModelForCausalLM
src, ids_file, out_file = sys.argv[1:]
model = AutoModelForCausalLM.from_pretrained(src, trust_remote_code=True).eval()
ids, mask = torch.load(ids_file)
with torch.no_grad():
    logits = model(ids, attention_mask=mask).logits
gen = model.generate(ids[1:], max_new_tokens=6, do_sample=False)
model.save_pretrained(src + "-resaved")
assert not [m for m in sys.modules if m == "llamba" or m.startswith("llamba.")]
torch.save({"module": type(model).__module__, "logits": logits, "gen": gen}, out_file)
"""


def test_saved_checkpoint_carries_generated_remote_code(tmp_path):
    make_checkpoint(tmp_path / "m")
    files = remote_code_files()
    for name in (CONFIG_FILE, MODELING_FILE):
        assert (tmp_path / "m" / name).read_text() == files[name]  # generated, never hand-edited
        third_party = {m for m in get_imports(tmp_path / "m" / name) if m not in sys.stdlib_module_names}
        assert third_party <= {"torch", "transformers"}, third_party
    assert json.loads((tmp_path / "m" / "config.json").read_text())["auto_map"] == AUTO_MAP
    for node in ast.walk(ast.parse(files[MODELING_FILE])):
        if isinstance(node, ast.ImportFrom):
            assert not (node.module or "").startswith("llamba"), node.module
        elif isinstance(node, ast.Import):
            assert not any(a.name.startswith("llamba") for a in node.names)


def test_remote_code_loads_without_the_package_and_equals_it(tmp_path):
    model = make_checkpoint(tmp_path / "m", seed=3)
    ids = torch.randint(3, 64, (2, 19), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    torch.save((ids, mask), tmp_path / "ids.pt")
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"))
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            REMOTE_PROBE,
            str(tmp_path / "m"),
            str(tmp_path / "ids.pt"),
            str(tmp_path / "out.pt"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    out = torch.load(tmp_path / "out.pt")
    assert out["module"].endswith("modeling_llamba")
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(out["logits"], want, rtol=1e-5, atol=1e-5)
    assert torch.equal(out["gen"], model.generate(ids[1:], max_new_tokens=6, do_sample=False))
    resaved = sorted(os.listdir(tmp_path / "m-resaved"))
    assert CONFIG_FILE in resaved and MODELING_FILE in resaved  # transformers re-saves remote code by itself


def test_cartesia_layout_through_auto_classes(tmp_path):
    """Nested ssm_cfg / mlp_cfg config, pytorch_model.bin with 'model.'-prefixed names, padded vocab."""
    config = tiny_llamba_config(
        n_v_heads=8, n_qk_heads=4
    )  # not the 9-head default: the nested values must be read
    model = random_model(config, seed=4)
    save_cartesia(model, tmp_path / "c")
    raw = json.loads((tmp_path / "c" / "config.json").read_text())
    raw["pad_vocab_size_multiple"] = 16  # 64 is already a multiple: padding leaves it as is
    (tmp_path / "c" / "config.json").write_text(json.dumps(raw))
    state = {f"model.{k}": v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    (tmp_path / "c" / "model.safetensors").unlink()
    torch.save(state, tmp_path / "c" / "pytorch_model.bin")
    cfg = AutoConfig.from_pretrained(tmp_path / "c")
    assert (cfg.n_v_heads, cfg.n_qk_heads, cfg.d_state, cfg.vocab_size) == (8, 4, 8, 64)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "c").eval()
    ids = torch.randint(3, 64, (1, 15), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
        torch.testing.assert_close(load_model(tmp_path / "c")(ids).logits, model(ids).logits)


def test_generation_config_carried_from_teacher_and_model_card(tmp_path):
    from conftest import tiny_teacher

    from llamba.distill.init import build_student

    teacher = tiny_teacher()
    teacher.generation_config.temperature, teacher.generation_config.do_sample = 0.6, True
    teacher.generation_config.eos_token_id = [1, 2]
    student = build_student(teacher)
    student.save_pretrained(tmp_path / "s")
    saved = GenerationConfig.from_pretrained(tmp_path / "s")
    assert (saved.temperature, saved.do_sample, saved.eos_token_id) == (0.6, True, [1, 2])
    card = (tmp_path / "s" / "README.md").read_text()
    assert "| distillation budget (tokens) | unknown |" in card and "not measured" in card
    record_distillation(
        tmp_path / "s", teacher="HuggingFaceTB/SmolLM2-135M-Instruct", tokens=1_500_000, ppl_ratio=1.2345
    )
    card = (tmp_path / "s" / "README.md").read_text()
    assert "| teacher | HuggingFaceTB/SmolLM2-135M-Instruct |" in card
    assert "| distillation budget (tokens) | 1,500,000 |" in card and "| 1.234 |" in card
    assert load_model(tmp_path / "s").config.distillation["tokens"] == 1_500_000
