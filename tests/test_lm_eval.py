"""lm-eval's stock `--model hf` path on a saved checkpoint, through the generated remote code (the llamba
package made unimportable): loglikelihood (multiple choice), rolling perplexity and generation on small
local task files, each checked against the package model's own numbers."""

import glob
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import checkpoint_tokenizer, make_checkpoint

pytest.importorskip("lm_eval")

from llamba.generate import SamplingParams, generate  # noqa: E402

MC = [
    {"q": "the cat sat on the", "choices": ["mat", "dog", "sun"], "label": 0},
    {"q": "what is the", "choices": ["moon", "tree", "rain"], "label": 1},
    {"q": "you and me", "choices": ["go", "run", "jump"], "label": 2},
]
PPL = ["the cat sat on the mat", "red sun and blue moon go up"]
GEN = ["the cat sat", "one two", "big red dog and a small"]
TASKS = {
    "mc": "output_type: multiple_choice\ndoc_to_text: '{{q}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: label\n"
    "metric_list:\n  - metric: acc\n",
    "ppl": "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
    "metric_list:\n  - metric: word_perplexity\n",
    "gen": "output_type: generate_until\ndoc_to_text: '{{q}}'\ndoc_to_target: '{{a}}'\ngeneration_kwargs:\n"
    "  until: ['<|im_end|>']\n  max_gen_toks: 5\n  do_sample: false\nmetric_list:\n  - metric: exact_match\n",
}
BLOCK_LLAMBA = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "llamba" or name.startswith("llamba."):
            raise ImportError("llamba is not installed here")
sys.meta_path.insert(0, Block())
from lm_eval.__main__ import cli_evaluate
sys.argv = ["lm_eval"] + sys.argv[1:]
cli_evaluate()
"""


def write_tasks(root, gen_targets):
    gen = [{"q": q, "a": a} for q, a in zip(GEN, gen_targets, strict=True)]
    data = {"mc": MC, "ppl": [{"text": t} for t in PPL], "gen": gen}
    for name, rows in data.items():
        (root / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
        (root / f"{name}.yaml").write_text(
            f"task: tiny_{name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {root / name}.jsonl\n"
            f"test_split: test\n{TASKS[name]}metadata:\n  version: 1.0\n"
        )


def logprob(model, context: list[int], continuation: list[int]) -> float:
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        lp = torch.log_softmax(model(ids).logits[0, :-1], -1)
    targets = ids[0, len(context) :]
    return float(lp[len(context) - 1 :].gather(1, targets[:, None]).sum())


@pytest.mark.slow
def test_lm_eval_hf_model_with_remote_code(tmp_path):
    model = make_checkpoint(tmp_path / "m", seed=5)
    tok = checkpoint_tokenizer()
    enc = lambda s: tok.encode(s, add_special_tokens=False)
    greedy = []
    for q in GEN:
        out = generate(model, enc(q), SamplingParams(max_new_tokens=5, stop_token_ids=(tok.eos_token_id,)))
        greedy.append(tok.decode([t for t in out if t != tok.eos_token_id]))
    (tmp_path / "tasks").mkdir()
    write_tasks(tmp_path / "tasks", [greedy[0], "no such answer", greedy[2]])
    env = dict(
        os.environ,
        HF_DATASETS_OFFLINE="1",
        HF_HUB_OFFLINE="1",
        HF_MODULES_CACHE=str(tmp_path / "modules"),
        HF_DATASETS_CACHE=str(tmp_path / "datasets"),
    )
    args = [
        "--model",
        "hf",
        "--model_args",
        f"pretrained={tmp_path / 'm'},trust_remote_code=True,dtype=float32",
        "--tasks",
        "tiny_mc,tiny_ppl,tiny_gen",
        "--include_path",
        str(tmp_path / "tasks"),
        "--device",
        "cpu",
        "--batch_size",
        "2",
        "--output_path",
        str(tmp_path / "out"),
        "--log_samples",
    ]
    run = subprocess.run(
        [sys.executable, "-c", BLOCK_LLAMBA, *args], capture_output=True, text=True, env=env, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    (result_file,) = glob.glob(str(tmp_path / "out" / "*" / "results_*.json"))
    results = json.loads(open(result_file).read())["results"]

    # Multiple choice: every (context, " choice") loglikelihood, and the accuracy they imply.
    (mc_file,) = glob.glob(str(tmp_path / "out" / "*" / "samples_tiny_mc_*.jsonl"))
    correct = 0
    for line, doc in zip(open(mc_file).read().splitlines(), MC, strict=True):
        got = [float(r[0][0]) for r in json.loads(line)["resps"]]
        want = [logprob(model, enc(doc["q"]), enc(" " + c)) for c in doc["choices"]]
        assert got == pytest.approx(want, rel=1e-4, abs=1e-4)
        correct += max(range(len(want)), key=want.__getitem__) == doc["label"]
    assert results["tiny_mc"]["acc,none"] == pytest.approx(correct / len(MC))

    # Rolling perplexity: each document scored from a one-token prefix (bos, else eos), per word.
    prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    ll = sum(logprob(model, [prefix], enc(t)) for t in PPL)
    words = sum(len(t.split()) for t in PPL)
    assert results["tiny_ppl"]["word_perplexity,none"] == pytest.approx(math.exp(-ll / words), rel=1e-4)

    # Generation (left-padded batches of 2): greedy text equals llamba.generate's.
    (gen_file,) = glob.glob(str(tmp_path / "out" / "*" / "samples_tiny_gen_*.jsonl"))
    texts = [json.loads(line)["resps"][0][0] for line in open(gen_file).read().splitlines()]
    assert texts == greedy
    assert results["tiny_gen"]["exact_match,none"] == pytest.approx(2 / 3)
