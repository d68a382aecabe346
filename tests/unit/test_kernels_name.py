"""Our kernels install as ``dist_supernet.kernels``: Hugging Face's top-level ``kernels`` package cannot shadow them.

``pip install kernels`` (hub compute kernels, used by transformers) installs a top-level
``kernels`` package; before, ours was top-level too and whichever was installed last won.
"""

import subprocess
import sys
import textwrap

# Run in a fresh interpreter whose sys.path starts with a directory holding a stand-in for
# Hugging Face's package, as a user's site-packages would after `pip install kernels`.
_STEP = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[1])
    import kernels                                    # the stand-in: what `pip install kernels` puts first
    assert kernels.HUB == "huggingface", kernels.__file__
    import torch
    from dist_supernet import Birder
    from dist_supernet import kernels as ours
    assert ours.__name__ == "dist_supernet.kernels" and ours is not kernels
    assert sys.modules["kernels"] is kernels          # nothing of ours replaced it
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    before = model.weight.detach().clone()
    opt = Birder(model.parameters(), lr=0.1)
    model(torch.randn(8, 4)).pow(2).sum().backward()
    opt.step()
    moved = (model.weight - before).abs()
    # one Birder step moves every coordinate by 0 or lr (|r| <= 1, one ±1 bit each)
    assert bool(((moved < 1e-6) | ((moved - 0.1).abs() < 1e-6)).all()) and bool((moved > 0).any())
    print("ok", ours.backend_for(model.weight))
""")


def test_a_top_level_kernels_package_does_not_shadow_ours(tmp_path):
    stub = tmp_path / "kernels"
    stub.mkdir()
    (stub / "__init__.py").write_text('HUB = "huggingface"\n')
    result = subprocess.run([sys.executable, "-c", _STEP, str(tmp_path)], capture_output=True, text=True,
                            timeout=180, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("ok "), result.stdout


# The reverse: `python -m pytest` / `python -m ...` run from a clone put the repository root first on
# sys.path, where our kernels/ folder answers `import kernels`. transformers imports Hugging Face's
# package by that name, so the folder must hand the name over (and say it is not a top-level package
# when nothing else provides one), not fail transformers with our own module.
_ROOT_FIRST = textwrap.dedent("""
    import importlib.machinery, os, sys
    root, stub_dir = sys.argv[1], sys.argv[2]
    others = [p for p in sys.path if p and os.path.abspath(p) != root]
    installed = importlib.machinery.PathFinder.find_spec("kernels", others)  # Hugging Face's, if installed
    installed = installed and installed.origin
    sys.path[:] = [root] + others                     # the clone's root first, as `python -m pytest` puts it
    try:
        import kernels
        assert kernels.__file__ == installed and not kernels.__file__.startswith(root), kernels.__file__
    except ModuleNotFoundError as error:              # nothing else provides the name: ours says what it is
        assert installed is None and error.name == "kernels" and "dist_supernet.kernels" in str(error), error
    sys.modules.pop("kernels", None)
    sys.path[:] = [root, stub_dir] + others           # a stand-in right after the root: the next one on the path
    import kernels
    assert kernels.HUB == "huggingface", kernels.__file__
    from dist_supernet import kernels as ours
    assert ours.__name__ == "dist_supernet.kernels" and callable(ours.compress)
    print("ok")
""")


def test_our_folder_on_sys_path_hands_the_top_level_name_over(tmp_path):
    import os

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text('HUB = "huggingface"\n')
    result = subprocess.run([sys.executable, "-c", _ROOT_FIRST, root, str(tmp_path)], capture_output=True,
                            text=True, timeout=180, cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout == "ok\n", result.stdout
