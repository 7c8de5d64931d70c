"""Our top-level `kernels` shares its name with HF's kernel-hub package: it must not look like that package to
transformers, must not import transformers, and qwen35 must refuse a foreign `kernels`."""

import subprocess
import sys
import textwrap

import kernels


def _run(code: str, cwd=None) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter; with cwd, that directory comes first on sys.path."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=cwd)


def test_kernels_has_no_version_and_does_not_import_transformers():
    assert not hasattr(kernels, "__version__")
    result = _run("""
        import sys, kernels, qwen35
        assert 'transformers' not in sys.modules, 'kernels/qwen35 imported transformers'
    """)
    assert result.returncode == 0, result.stderr


def test_transformers_does_not_see_a_kernel_hub():
    result = _run("""
        from transformers.utils.import_utils import is_kernels_available
        assert is_kernels_available() is False
    """)
    assert result.returncode == 0, result.stderr


def test_qwen35_refuses_a_foreign_kernels_package(tmp_path):
    fake = tmp_path / "kernels"
    fake.mkdir()
    (fake / "__init__.py").write_text("__version__ = '0.18.2'\n")
    result = _run("import qwen35", cwd=tmp_path)
    assert result.returncode != 0
    assert "ImportError" in result.stderr and str(fake) in result.stderr
