"""``dist_supernet.integrations.*`` import without Lightning, Accelerate or transformers installed.

A fresh interpreter whose import system refuses those packages (as if never installed): the modules
import, import none of them, and each framework-bound name raises one ImportError saying what to
install; Accelerate's ``attach`` needs no Accelerate at all.
"""

import subprocess
import sys
import textwrap

_BLOCKED = textwrap.dedent("""
    import importlib.abc, sys
    BLOCKED = ("lightning", "pytorch_lightning", "lightning_fabric", "transformers", "accelerate")

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, Block())
    import torch
    import dist_supernet.integrations
    from dist_supernet.integrations import accelerate, lightning, transformers
    from dist_supernet import Birder
    assert not [m for m in sys.modules if m.split(".")[0] in BLOCKED], sorted(sys.modules)
    for module, name, install in ((lightning, "BirderDDPStrategy", "pip install lightning"),
                                  (transformers, "BirderCallback", "pip install transformers")):
        try:
            getattr(module, name)
            raise SystemExit(f"{name} resolved without its framework")
        except ImportError as error:
            assert install in str(error), error
    model = torch.nn.Linear(3, 2)
    assert accelerate.attach(model, Birder(model.parameters(), lr=0.1)) is False   # one process: runs locally
    try:
        accelerate.attach(model, torch.optim.AdamW(model.parameters()))
        raise SystemExit("attach took AdamW")
    except TypeError as error:
        assert "not dist_supernet.Birder" in str(error), error
    print("ok")
""")


def test_integrations_import_without_their_frameworks(tmp_path):
    result = subprocess.run([sys.executable, "-c", _BLOCKED], capture_output=True, text=True, timeout=180,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-2000:]
    assert result.stdout == "ok\n", result.stdout
