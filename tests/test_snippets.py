"""Every ```python block in README.md and docs/*.md runs (snippets cannot rot). The blocks use the paper's sizes
(DiT-XL/2); here the registry hands out the same architecture at toy width (64, depth 4, 8x8 inputs) so that a block
runs in a second, and the inputs the blocks leave undefined (x, t, y and the guided batch x2, t2, y2) are given."""

import glob
import os
import re

import pytest
import torch

import models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def python_blocks():
    for path in [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]:
        with open(path) as f:
            text = f.read()
        for i, block in enumerate(re.findall(r"```python\n(.*?)```", text, flags=re.S)):
            yield pytest.param(block, id=f"{os.path.relpath(path, ROOT)}#{i}")


class ToyRegistry(dict):
    def __getitem__(self, name):
        build = super().__getitem__(name)
        return lambda **kwargs: build(**{"hidden_size": 64, "depth": 4, "num_heads": 2, "input_size": 8, **kwargs})


def test_there_are_snippets():
    assert len(list(python_blocks())) >= 2


@pytest.mark.parametrize("block", python_blocks())
def test_snippet_runs(block, monkeypatch):
    monkeypatch.setattr(models, "DiT_models", ToyRegistry(models.DiT_models))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t, y = torch.tensor([500, 500]), torch.tensor([3, 7])  # a sampling batch: one timestep (reuse needs it)
    namespace = {"torch": torch, "x": x, "t": t, "y": y, "x2": torch.cat([x[:1], x[:1]]), "t2": t[:1].repeat(2),
                 "y2": torch.tensor([3, 1000])}
    exec(compile(block, "<snippet>", "exec"), namespace)
