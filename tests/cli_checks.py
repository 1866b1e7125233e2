"""Assertions shared by the CLI tests."""


def one_line_error(result, *needles: str) -> str:
    """A click result that failed with exit 1, no traceback and exactly one `Error:` line holding every needle."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.strip().splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]
