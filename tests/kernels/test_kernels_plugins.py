"""A third-party backend declared through the `tokenspeed.kernels` entry-point group is found
and selected. The plugin is a real distribution (a .dist-info with entry_points.txt) placed on
sys.path, which is what `pip install` produces, without a slow pip run."""
import sys
import textwrap

import torch

import kernels
from kernels import plugins

PLUGIN = textwrap.dedent('''
    import kernels

    @kernels.register("rms_norm", backend="demo_plugin", priority=50,
                      supports=lambda f: f.get("demo", False))
    def demo_rms_norm(x, weight, eps):
        return x * 0 + 42
''')

FACTORY = textwrap.dedent('''
    import kernels

    def register_all():
        @kernels.register("silu_and_mul", backend="demo_factory", priority=50,
                          supports=lambda f: f.get("demo", False))
        def demo(x):
            return x[:, : x.shape[1] // 2] * 0 - 1
''')


def _make_dist(root, name, entry_points):
    dist = root / f"{name}-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[tokenspeed.kernels]\n" + entry_points + "\n")
    (dist / "RECORD").write_text("")


def test_entry_point_plugin_is_loaded_and_selected(tmp_path):
    (tmp_path / "tsk_demo_plugin.py").write_text(PLUGIN)
    (tmp_path / "tsk_demo_factory.py").write_text(FACTORY)
    _make_dist(tmp_path, "tsk_demo_plugin", "demo = tsk_demo_plugin")
    _make_dist(tmp_path, "tsk_demo_factory", "factory = tsk_demo_factory:register_all")
    (tmp_path / "tsk_bad.py").write_text("raise RuntimeError('boom')\n")
    _make_dist(tmp_path, "tsk_bad", "bad = tsk_bad")
    sys.path.insert(0, str(tmp_path))
    try:
        kernels.rescan_plugins()
        x = torch.randn(3, 8)
        fn = kernels.select("rms_norm", device="cpu", dtype=torch.float32, demo=True)
        assert torch.all(fn(x, torch.ones(8), 1e-6) == 42)
        assert "demo" in plugins.loaded and "factory" in plugins.loaded
        assert "bad" in plugins.failed  # a broken plugin is reported, not fatal
        assert "demo_plugin (priority 50): SELECTED" in kernels.explain(
            "rms_norm", device="cpu", dtype=torch.float32, demo=True)
        # without the feature the plugin refuses and the usual backend serves
        assert kernels.select("rms_norm", device="cpu", dtype=torch.float32) is not fn
        g = kernels.select("silu_and_mul", device="cpu", dtype=torch.float32, demo=True)
        assert torch.all(g(torch.randn(2, 4)) == -1)
        kernels.set_overrides({"rms_norm": "demo_plugin"})
        assert kernels.select("rms_norm", device="cpu", dtype=torch.float32, demo=True) is fn
    finally:
        kernels.unregister("rms_norm", "demo_plugin")
        kernels.unregister("silu_and_mul", "demo_factory")
        sys.path.remove(str(tmp_path))
