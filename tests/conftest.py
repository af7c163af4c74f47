"""Shared fixtures for the klbelt test suite."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

if not torch.cuda.is_available():  # before anything imports Triton: its kernels then run on CPU tensors
    os.environ.setdefault("TRITON_INTERPRET", "1")  # (tests/test_triton_kernels.py)

import klbelt.kl as klcore


@pytest.fixture
def kl_backend():
    """Switch the KL kernel backend inside one test; the previous one is restored after it.

    Usage: ``def test_x(kl_backend): kl_backend("eager")``.
    """
    previous = klcore.get_backend()
    yield klcore.set_backend
    klcore.set_backend(previous)


@pytest.fixture
def compiled_kernels(kl_backend):
    """Run the test with the ``torch.compile`` kernels (skipped where no C++ compiler exists).

    The first call compiles (seconds to tens of seconds on a CPU): keep such tests few and small.
    """
    if not any(shutil.which(cxx) for cxx in ("c++", "g++", "clang++")):
        pytest.skip("torch.compile on CPU needs a C++ compiler")
    kl_backend("compile")


@pytest.fixture
def gen():
    """A seeded CPU random generator, so every sampled test is reproducible."""
    return torch.Generator().manual_seed(20240611)
