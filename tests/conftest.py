"""Session set-up shared by every test module."""

import pytest

from seqmarl.nn import cpp_decode


@pytest.fixture(scope="session", autouse=True)
def cpp_decode_built():
    """Build (or load) MAT's C++ decode loop once, before any test: on a fresh machine the build takes
    about a minute, which would otherwise land inside whichever test first makes a MAT model, possibly
    a subprocess with a timeout (CLI, benchmark and resume tests). Without a compiler this prints the
    fallback notice and MAT decodes in Python."""
    cpp_decode.extension("auto")
