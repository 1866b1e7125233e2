"""`llamba export mlx`, `llamba chat`, `llamba generate`: argument parsing over export.convert / llamba.chat.

Nothing here imports mlx, torch or transformers at module level, so `--help` is fast and `--backend torch`
works without mlx."""

from __future__ import annotations

import sys
import time

import click

from llamba.export.convert import DTYPES, Q_GROUP_SIZES, ExportError

BACKENDS = ("auto", "mlx", "torch")


def _fail(e: Exception) -> click.ClickException:
    return click.ClickException(str(e).splitlines()[0] if str(e) else type(e).__name__)


@click.group()
def export() -> None:
    """Convert a Llamba checkpoint to an on-device format."""


@export.command("mlx")
@click.option(
    "--model", "model_path", required=True, type=click.Path(), help="Llamba checkpoint (ours or cartesia's)."
)
@click.option("--out", "out_dir", required=True, type=click.Path(), help="New output directory.")
@click.option(
    "--q-bits",
    type=click.Choice(["4", "8"]),
    default=None,
    help="Quantize linears/embedding (affine); default: no quantization.",
)
@click.option(
    "--q-group-size",
    type=click.Choice([str(g) for g in Q_GROUP_SIZES]),
    default="64",
    show_default=True,
    help="Weights sharing one quantization scale; layers whose width it does not divide stay unquantized.",
)
@click.option(
    "--dtype",
    type=click.Choice(DTYPES),
    default="float16",
    show_default=True,
    help="dtype of the unquantized weights.",
)
@click.option(
    "--tokenizer",
    type=click.Path(),
    default=None,
    help="Tokenizer directory (default: the checkpoint's, else the embedded SmolLM2 teacher's).",
)
def export_mlx(model_path, out_dir, q_bits, q_group_size, dtype, tokenizer) -> None:
    """Write an MLX model directory that `llamba chat` and mlx-lm (--trust-remote-code) load."""
    from llamba.export.chat import require_mlx

    try:
        require_mlx()
        from llamba.export.convert import convert

        out = convert(
            model_path,
            out_dir,
            q_bits=int(q_bits) if q_bits else None,
            q_group_size=int(q_group_size),
            dtype=dtype,
            tokenizer=tokenizer,
        )
    except ExportError as e:
        raise _fail(e) from None
    click.echo(f"wrote {out}  (mlx_lm.generate --model {out} --trust-remote-code)")


def _sampling_options(f):
    for opt in reversed(
        [
            click.option(
                "--max-tokens",
                type=click.IntRange(min=0),
                default=256,
                show_default=True,
                help="Most tokens to generate per answer (an end-of-turn token stops earlier).",
            ),
            click.option(
                "--temp",
                type=click.FloatRange(min=0),
                default=0.0,
                show_default=True,
                help="Sampling temperature; 0 = greedy.",
            ),
            click.option(
                "--top-p",
                type=click.FloatRange(0, 1, min_open=True),
                default=1.0,
                show_default=True,
                help="Nucleus sampling: keep the most likely tokens holding this probability mass (1 = off).",
            ),
            click.option(
                "--top-k",
                type=click.IntRange(min=0),
                default=0,
                show_default=True,
                help="Sample among the k most likely tokens only (0 = off).",
            ),
            click.option(
                "--repetition-penalty",
                type=click.FloatRange(min=0, min_open=True),
                default=1.0,
                show_default=True,
                help="CTRL-style penalty on tokens already in the context (>1 discourages repeats; "
                "the demo uses 1.2; 1 = off).",
            ),
            click.option(
                "--seed", type=int, default=None, help="Random seed for sampling (default: unseeded)."
            ),
            click.option("--system", default=None, help="System prompt."),
            click.option(
                "--backend",
                type=click.Choice(BACKENDS),
                default="auto",
                show_default=True,
                help="auto: mlx for an exported directory, torch for a checkpoint.",
            ),
            click.option(
                "--compile",
                "compile_step",
                is_flag=True,
                help="torch backend: decode through torch.compile of the whole step (the first token waits "
                "about a minute on 2 CPU cores; then 1.2x tok/s measured there).",
            ),
            click.option(
                "--model",
                "model_path",
                required=True,
                type=click.Path(),
                help="Exported MLX directory or Llamba checkpoint.",
            ),
        ]
    ):
        f = opt(f)
    return f


def _engine(model_path: str, backend: str, compile_step: bool = False):
    from llamba.export.chat import open_engine, require_mlx

    try:
        if backend == "mlx":
            require_mlx()
        engine = open_engine(model_path, backend)
    except ExportError as e:
        raise _fail(e) from None
    if compile_step:
        if engine.name != "torch":
            raise click.ClickException(
                f"--compile is for the torch backend; {model_path} runs on {engine.name} "
                "(drop --compile, or pass a Llamba checkpoint)"
            )
        engine.model.use_compiled_step()
    return engine


def _stats(n_prompt: int, t_prompt: float, n_gen: int, t_gen: float, peak: int) -> str:
    return (
        f"[prompt {n_prompt} tok {n_prompt / max(t_prompt, 1e-9):.1f} tok/s | "
        f"{n_gen} tok {n_gen / max(t_gen, 1e-9):.2f} tok/s | peak {peak / 2**20:.1f} MiB]"
    )


def _stream(engine, tokens, stop: tuple[int, ...], n_prompt) -> list[int]:
    """Echo the tokens of an iterator as text as they come, then the speed line on stderr.
    n_prompt: a callable giving the number of prompt tokens fed (known once the iterator has started)."""
    from llamba.chat import TextStream

    out = TextStream(engine.tokenizer, stop)
    engine.reset_peak_memory()
    t0 = time.perf_counter()
    t_first, ids = None, []
    for tok in tokens:
        t_first = t_first or time.perf_counter()
        ids.append(tok)
        click.echo(out.push(tok), nl=False)
    end = time.perf_counter()
    click.echo()
    t_first = t_first or end
    # The first token comes with the prefill; the rest is decoding.
    click.echo(
        _stats(n_prompt(), t_first - t0, max(len(ids) - 1, 0), end - t_first, engine.peak_memory()), err=True
    )
    return ids


@click.command()
@_sampling_options
def chat(
    model_path, backend, compile_step, max_tokens, temp, top_p, top_k, repetition_penalty, seed, system
) -> None:
    """Multi-turn chat; the context is carried in the recurrent state. /reset clears it, /exit quits."""
    from llamba.chat import ChatSession
    from llamba.generate import SamplingParams

    engine = _engine(model_path, backend, compile_step)
    try:
        params = SamplingParams(
            temperature=temp,
            top_p=top_p,
            top_k=top_k,
            repetition_penalty=repetition_penalty,
            max_new_tokens=max_tokens,
            seed=seed,
        )
        session = ChatSession(engine, params, system=system)
    except (ExportError, ValueError) as e:
        raise _fail(e) from None
    click.echo(f"llamba chat ({engine.name}) - /reset clears the conversation, /exit quits", err=True)
    while True:
        try:
            line = input(">> ").strip()
        except (EOFError, KeyboardInterrupt):
            click.echo()
            return
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            session.reset()
            click.echo("(conversation cleared)", err=True)
            continue
        if not line:
            continue
        try:
            _stream(engine, session.send(line), session.params.stop_token_ids, lambda: session.prefilled)
        except ExportError as e:
            raise _fail(e) from None


@click.command()
@_sampling_options
@click.option("--prompt", required=True, help="Prompt text ('-' reads stdin).")
@click.option("--raw", is_flag=True, help="Feed the prompt as-is, without the chat template.")
def generate(
    model_path,
    backend,
    compile_step,
    max_tokens,
    temp,
    top_p,
    top_k,
    repetition_penalty,
    seed,
    system,
    prompt,
    raw,
) -> None:
    """One-shot generation for scripts: the answer on stdout, a speed line on stderr."""
    from llamba.chat import prompt_ids, prompt_messages
    from llamba.generate import SamplingParams, chat_stop_ids

    engine = _engine(model_path, backend, compile_step)
    if prompt == "-":
        prompt = sys.stdin.read()
    tok = engine.tokenizer
    try:
        ids = (
            tok.encode(prompt, add_special_tokens=True)
            if raw
            else prompt_ids(tok, prompt_messages(prompt, system))
        )
        params = SamplingParams(
            temperature=temp,
            top_p=top_p,
            top_k=top_k,
            repetition_penalty=repetition_penalty,
            max_new_tokens=max_tokens,
            seed=seed,
            stop_token_ids=chat_stop_ids(tok),
        )
    except (ExportError, ValueError) as e:
        raise _fail(e) from None
    if not ids:
        raise click.ClickException("the prompt is empty")
    _stream(engine, engine.stream(ids, engine.new_state(), params), params.stop_token_ids, lambda: len(ids))
