"""Chat carries context in the recurrent state and samples exactly what one-shot generation samples."""

import pytest
from click.testing import CliRunner
from conftest import make_checkpoint, tiny_llamba_config

pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

from llamba.chat import ChatSession, prompt_ids, prompt_messages  # noqa: E402
from llamba.export.chat import MlxEngine  # noqa: E402
from llamba.export.cli import chat, generate  # noqa: E402
from llamba.export.convert import convert  # noqa: E402
from llamba.export.mlx_generate import generate as mlx_generate  # noqa: E402
from llamba.generate import SamplingParams, chat_stop_ids  # noqa: E402

PARAMS = SamplingParams(temperature=0.8, top_p=0.95, max_new_tokens=8, seed=3)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    make_checkpoint(root / "ckpt", tiny_llamba_config(), seed=11)
    return root / "ckpt", convert(root / "ckpt", root / "mlx", dtype="float32")


def test_two_turns_equal_one_shot_generation(dirs):
    engine = MlxEngine(dirs[1])
    tok = engine.tokenizer
    session = ChatSession(engine, PARAMS)
    first = list(session.send("hello world"))
    full_2 = prompt_ids(tok, session.messages + [{"role": "user", "content": "the cat sat"}])
    fed_before = list(session.fed)
    second = list(session.send("the cat sat"))
    assert session.state.seqlen == len(session.fed)  # every fed token, stop tokens included, is in the state
    # The answer re-renders to the same ids, so turn 2 feeds only its new tokens, not the whole history.
    assert full_2[: len(fed_before)] == fed_before
    assert session.prefilled == len(full_2) - len(fed_before) < len(full_2)

    params = PARAMS.with_overrides(stop_token_ids=chat_stop_ids(tok))
    assert mlx_generate(engine.model, prompt_ids(tok, prompt_messages("hello world")), params) == first
    assert mlx_generate(engine.model, full_2, params) == second


def test_chat_cli_matches_generate_cli(dirs):
    runner = CliRunner()
    args = ["--model", str(dirs[1]), "--temp", "0.8", "--top-p", "0.95", "--seed", "3", "--max-tokens", "8"]
    res = runner.invoke(chat, args, input="hello world\nthe cat sat\n/reset\nhello world\n/exit\n")
    assert res.exit_code == 0, res.output
    answers = [a.strip() for a in res.stdout.split(">> ") if a.strip()]  # /reset and /exit print no answer
    assert len(answers) == 3 and answers[0] == answers[2]  # /reset forgets the first two turns
    assert res.stderr.count("[prompt") == 3 and "peak" in res.stderr
    one_shot = runner.invoke(generate, args + ["--prompt", "hello world"])
    assert one_shot.exit_code == 0, one_shot.output
    assert one_shot.stdout.strip() == answers[0]


def test_torch_backend_matches_mlx_greedy(dirs):
    runner = CliRunner()
    outs = [
        runner.invoke(generate, ["--model", str(d), "--prompt", "what is the sun", "--max-tokens", "6"])
        for d in dirs
    ]
    assert all(r.exit_code == 0 for r in outs), [r.output for r in outs]
    assert outs[0].stdout == outs[1].stdout
    res = runner.invoke(
        chat, ["--model", str(dirs[0]), "--backend", "torch", "--max-tokens", "4"], input="hello\n"
    )
    assert res.exit_code == 0 and "tok/s" in res.stderr


def test_not_a_model_dir_is_one_line(tmp_path):
    res = CliRunner().invoke(generate, ["--model", str(tmp_path), "--prompt", "hi"])
    assert res.exit_code == 1 and len(res.output.strip().splitlines()) == 1 and "config.json" in res.output


def test_compile_flag_reaches_the_torch_model_and_is_refused_for_mlx(dirs, monkeypatch):
    from llamba.model import LlambaForCausalLM

    calls = []
    monkeypatch.setattr(
        LlambaForCausalLM, "use_compiled_step", lambda self, enabled=True: calls.append(enabled)
    )
    runner = CliRunner()
    args = ["--prompt", "what is the sun", "--max-tokens", "4"]
    plain = runner.invoke(generate, ["--model", str(dirs[0]), *args])
    res = runner.invoke(generate, ["--model", str(dirs[0]), "--compile", *args])
    assert res.exit_code == 0 and calls == [True] and res.stdout == plain.stdout, res.output
    res = runner.invoke(generate, ["--model", str(dirs[1]), "--compile", *args])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert "--compile is for the torch backend" in res.output and len(res.output.strip().splitlines()) == 1
