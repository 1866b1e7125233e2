"""The CLI stays light: `--help` never imports torch, every option of ours explains itself, and
`--repetition-penalty` reaches the sampler."""

import subprocess
import sys

import click
import pytest
from click.testing import CliRunner
from conftest import checkpoint_tokenizer, make_checkpoint

from llamba.generate import SamplingParams, generate

HELP_PROBE = """
import sys
from click.testing import CliRunner
from llamba.cli import main
res = CliRunner().invoke(main, sys.argv[1:], prog_name="llamba")
assert res.exit_code == 0, res.output
assert "Usage:" in res.output
heavy = sorted(m for m in ("torch", "transformers", "mlx") if m in sys.modules)
print("HEAVY=" + ",".join(heavy))
"""


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["generate", "--help"],
        ["chat", "--help"],
        ["export", "--help"],
        ["export", "mlx", "--help"],
        ["icrl", "--help"],
    ],
)
def test_help_does_not_import_torch(argv):
    out = subprocess.run(
        [sys.executable, "-c", HELP_PROBE, *argv], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "HEAVY=\n" in out.stdout, out.stdout


def test_import_llamba_is_lazy_and_names_still_resolve():
    probe = (
        "import sys, llamba; assert 'torch' not in sys.modules; "
        "from llamba import LlambaConfig, generate, load_model; assert callable(generate); "
        "assert set(llamba.__all__) <= set(dir(llamba)); print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def _commands(group: click.Group, ctx: click.Context, names: list[str]):
    for name in names:
        cmd = group.get_command(ctx, name)
        yield name, cmd
        if isinstance(cmd, click.Group):
            for sub, subcmd in _commands(cmd, ctx, cmd.list_commands(ctx)):
                yield f"{name} {sub}", subcmd


def test_every_option_of_ours_has_help():
    from llamba.cli import main

    ctx = click.Context(main)
    missing = [
        f"{path} {p.opts[0]}"
        for path, cmd in _commands(main, ctx, ["demo", "export", "chat", "generate", "icrl"])
        for p in cmd.params
        if isinstance(p, click.Option) and not p.help and not p.hidden
    ]
    assert missing == []


def test_repetition_penalty_option_reaches_the_sampler(tmp_path):
    from llamba.chat import prompt_ids, prompt_messages
    from llamba.export.cli import generate as generate_cmd

    model = make_checkpoint(tmp_path / "m")
    args = ["--model", str(tmp_path / "m"), "--backend", "torch", "--prompt", "the cat", "--max-tokens", "12"]
    runner = CliRunner()
    plain, penalized = (
        runner.invoke(generate_cmd, args + extra) for extra in ([], ["--repetition-penalty", "3"])
    )
    assert plain.exit_code == 0 and penalized.exit_code == 0, penalized.output
    tok = checkpoint_tokenizer()
    ids = prompt_ids(tok, prompt_messages("the cat", None))
    want = generate(
        model, ids, SamplingParams(max_new_tokens=12, repetition_penalty=3.0, stop_token_ids=(2,))
    )
    assert penalized.stdout.splitlines()[0] == tok.decode([t for t in want if t != 2])
    assert plain.stdout != penalized.stdout
    bad = runner.invoke(generate_cmd, args + ["--repetition-penalty", "0"])
    assert bad.exit_code == 2 and "repetition-penalty" in bad.output


@pytest.mark.parametrize("order", ["llamba first", "transformers first", "base classes after llamba"])
def test_auto_classes_know_llamba_in_any_import_order(tmp_path, order):
    """The lazy package still registers model_type 'llamba' with the Auto classes (post-import hook)."""
    make_checkpoint(tmp_path / "m")
    first = {
        "llamba first": "import llamba\nfrom transformers import AutoModelForCausalLM",
        "transformers first": "from transformers import AutoModelForCausalLM\nimport llamba",
        "base classes after llamba": "import llamba\nfrom transformers import PreTrainedModel\n"
        "from transformers import AutoModelForCausalLM",
    }[order]
    probe = (
        f"{first}\nm = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'm')!r})\n"
        "print(type(m).__module__)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("llamba.model")
