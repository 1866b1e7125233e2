"""convert(): both checkpoint layouts, quantization, mlx-lm compatibility, and one-line errors."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import make_checkpoint, tiny_llamba_config

mx = pytest.importorskip("mlx.core")
mlx_lm = pytest.importorskip("mlx_lm")

from mlx_lm.generate import generate_step  # noqa: E402

from llamba.checkpoints import save_cartesia  # noqa: E402
from llamba.export.chat import require_mlx  # noqa: E402
from llamba.export.cli import export  # noqa: E402
from llamba.export.convert import ExportError, convert  # noqa: E402
from llamba.export.mlx_generate import generate, load  # noqa: E402

# 8-bit affine, group 32: mean KL(fp32 || q8) per token over random prompts stays below this.
Q8_KL = 5e-3


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    model = make_checkpoint(
        path, tiny_llamba_config(d_model=64, intermediate_size=128, d_state=16, n_v_heads=4)
    )
    return path, model


def logits_np(model, ids: torch.Tensor) -> np.ndarray:
    return np.array(model(mx.array(ids.numpy())).astype(mx.float32))


def prompts(vocab: int, n: int = 4, length: int = 24) -> torch.Tensor:
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("layout", ["ours", "cartesia"])
def test_convert_both_layouts_matches_torch(checkpoint, tmp_path, layout):
    src, model = checkpoint
    if layout == "cartesia":
        src = save_cartesia(model, tmp_path / "cartesia")  # no tokenizer: falls back to --tokenizer
    out = convert(src, tmp_path / "mlx", dtype="float32", tokenizer=checkpoint[0])
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "mlx_llamba.py", "tokenizer.json"} <= files
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llamba" and config["model_file"] == "mlx_llamba.py"
    mlx_model, tok = load(out)
    assert tok.chat_template
    ids = prompts(model.config.vocab_size, 2)
    with torch.no_grad():
        ref = model(ids).logits.numpy()
    err = np.abs(logits_np(mlx_model, ids) - ref).max() / np.abs(ref).max()
    print(layout, "rel err", err)
    assert err < 1e-4


def test_q8_within_kl_of_fp32_and_keeps_precision_where_needed(checkpoint, tmp_path):
    src, model = checkpoint
    fp32, _ = load(convert(src, tmp_path / "fp32", dtype="float32"), tokenizer=False)
    q8, _ = load(convert(src, tmp_path / "q8", dtype="float32", q_bits=8, q_group_size=32), tokenizer=False)
    mixer = q8.backbone.layers[0].mixer
    assert "scales" in mixer.in_proj and "scales" not in mixer.a_proj  # the decay stays full precision
    assert mixer.conv1d.weight.dtype == mx.float32 and mixer.D.dtype == mx.float32
    ids = prompts(model.config.vocab_size)
    logp, logq = (torch.log_softmax(torch.from_numpy(logits_np(m, ids)), -1) for m in (fp32, q8))
    kl = (logp.exp() * (logp - logq)).sum(-1).mean().item()
    print(f"KL(fp32 || q8) = {kl:.2e} nats/token (bound {Q8_KL})")
    assert kl < Q8_KL


def test_q4_export_loads_and_runs(checkpoint, tmp_path):
    out = convert(checkpoint[0], tmp_path / "q4", q_bits=4, q_group_size=32)
    model, _ = load(out, tokenizer=False)
    cache = model.make_cache()
    logits = model(mx.array([[1, 2, 3]]), cache=cache)
    logits = model(mx.array([[4]]), cache=cache)
    assert logits.shape == (1, 1, 64) and bool(mx.isfinite(logits.astype(mx.float32)).all())


def test_mlx_lm_loads_export_unchanged(checkpoint, tmp_path):
    src, model = checkpoint
    out = convert(src, tmp_path / "mlx", dtype="float32")
    with pytest.raises(ValueError, match="trust_remote_code"):
        mlx_lm.load(str(out))
    lm_model, lm_tok = mlx_lm.load(str(out), trust_remote_code=True)
    ids = prompts(model.config.vocab_size, 1)
    with torch.no_grad():
        ref = model(ids).logits.numpy()
    assert np.abs(logits_np(lm_model, ids) - ref).max() / np.abs(ref).max() < 1e-4
    ours, _ = load(out, tokenizer=False)
    prompt = lm_tok.apply_chat_template(
        [{"role": "user", "content": "hello world"}], add_generation_prompt=True
    )
    # mlx-lm's greedy decode through its own cache handling == our model's greedy decode.
    steps = generate_step(mx.array(prompt), lm_model)
    lm_ids = [int(tok) for (tok, _), _ in zip(steps, range(6), strict=False)]
    assert generate(ours, prompt, max_new_tokens=6) == lm_ids
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlx_lm",
            "generate",
            "--model",
            str(out),
            "--trust-remote-code",
            "--prompt",
            "hello world",
            "--max-tokens",
            "4",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cli.returncode == 0, cli.stderr[-2000:]
    assert "Generation: 4 tokens" in cli.stdout


def test_bad_inputs_are_one_line_errors(checkpoint, tmp_path):
    src, _ = checkpoint
    runner = CliRunner()
    res = runner.invoke(export, ["mlx", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    assert (
        res.exit_code == 1 and res.output.startswith("Error:") and len(res.output.strip().splitlines()) == 1
    )
    out = convert(src, tmp_path / "mlx", dtype="float32")
    res = runner.invoke(export, ["mlx", "--model", str(src), "--out", str(out)])
    assert res.exit_code == 1 and "not empty" in res.output
    with pytest.raises(ExportError, match="not an exported MLX model"):
        load(tmp_path)
    with pytest.raises(ExportError, match="not an MLX Llamba export"):
        load(src)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(config | {"n_layer": 3}))
    with pytest.raises(ExportError, match="does not match") as err:
        load(out)
    assert "\n" not in str(err.value)


def test_missing_mlx_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlx_lm", None)  # import mlx_lm now raises ImportError
    with pytest.raises(ExportError, match="pip install") as err:
        require_mlx()
    assert "\n" not in str(err.value)
