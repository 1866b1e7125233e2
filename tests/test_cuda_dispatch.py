"""Kernel choice without the kernels: what `kernels="cuda"` says when mamba-ssm / causal-conv1d are missing or
broken (runs in the main CPU suite; the kernels themselves are tested in test_cuda_path.py)."""

import sys

import pytest

from llamba import ops


@pytest.fixture
def fresh_kernels(monkeypatch):
    """`_cuda_kernels` caches its import; clear it around the test so the test's fake packages are seen."""
    for name in [
        m for m in sys.modules if m.split(".")[0] in ("causal_conv1d", "mamba_ssm", "causal_conv1d_cuda")
    ]:
        monkeypatch.delitem(sys.modules, name)
    ops._cuda_kernels.cache_clear()
    yield
    ops._cuda_kernels.cache_clear()


def fake_package(root, name, body):
    (root / name).mkdir()
    (root / name / "__init__.py").write_text(body)


def test_broken_install_reports_the_real_import_error(tmp_path, monkeypatch, fresh_kernels):
    """Failure 7: a broken install (both packages present, an extension failing to load) reported only
    "needs mamba-ssm and causal-conv1d"."""
    fake_package(
        tmp_path, "causal_conv1d", "raise ImportError('libcudart.so.12: cannot open shared object file')\n"
    )
    fake_package(tmp_path, "mamba_ssm", "")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ops.KernelsUnavailable) as err:
        ops.resolve_kernels("cuda", "cpu")
    msg = str(err.value)
    assert "libcudart.so.12" in msg and "ImportError" in msg and "reinstall" in msg
    assert "\n" not in msg


def test_missing_packages_give_the_install_hint(monkeypatch, fresh_kernels):
    monkeypatch.setitem(sys.modules, "causal_conv1d", None)  # import raises ModuleNotFoundError, as if absent
    with pytest.raises(
        ops.KernelsUnavailable,
        match=r"^kernels='cuda' needs mamba-ssm and causal-conv1d: pip install 'llamba\[cuda\]'",
    ):
        ops.resolve_kernels("cuda", "cpu")
