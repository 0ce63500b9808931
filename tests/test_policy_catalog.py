"""The policies directory as Kubernetes mounts a ConfigMap: files are symlinks through ``..data``,
and an update swaps ``..data`` atomically to a new timestamped directory (no file is "modified")."""

from __future__ import annotations

import os
from pathlib import Path

from controller.runtime.policy_source import PolicyCatalog

POLICY = """\
metadata: {{name: {name}}}
spec:
  source: {{service: istio-system/{name}-a}}
  target: {{service: istio-system/{name}-b}}
  schedule: {{steps: [10, 100], bakeTime: {bake}}}
  gates: {{errorRate: {{max: 0.01}}}}
"""


def mount(root: Path, version: str, files: dict[str, str]) -> None:
    """Lay out one ConfigMap version and point ..data at it, as the kubelet does."""
    data = root / f"..{version}"
    data.mkdir()
    for name, text in files.items():
        (data / name).write_text(text)
    tmp = root / "..data_tmp"
    tmp.symlink_to(data.name)
    os.replace(tmp, root / "..data")  # atomic swap
    for name in files:
        link = root / name
        if not link.is_symlink():
            link.symlink_to(f"..data/{name}")


def test_symlink_swap_is_seen_and_hidden_entries_are_ignored(tmp_path: Path) -> None:
    mount(tmp_path, "2026_11_24_v1", {"shop.yaml": POLICY.format(name="shop", bake="5m")})
    catalog = PolicyCatalog(tmp_path)
    first = catalog.refresh()
    assert first is not None and list(first.policies) == ["shop"] and first.errors == ()
    assert catalog.refresh() is None  # nothing changed, nothing reported

    mount(tmp_path, "2026_11_24_v2", {"shop.yaml": POLICY.format(name="shop", bake="9m")})
    second = catalog.refresh()
    assert second is not None
    assert second.policies["shop"].policy.spec.schedule.bake_time.total_seconds() == 540


def test_a_file_gone_bad_keeps_its_last_good_policy_and_a_removed_one_goes(tmp_path: Path) -> None:
    mount(
        tmp_path,
        "v1",
        {"shop.yaml": POLICY.format(name="shop", bake="5m"), "api.yaml": POLICY.format(name="api", bake="5m")},
    )
    catalog = PolicyCatalog(tmp_path)
    assert set(catalog.refresh().policies) == {"shop", "api"}  # type: ignore[union-attr]

    mount(
        tmp_path,
        "v2",
        {
            "shop.yaml": POLICY.format(name="shop", bake="five minutes"),
            "api.yaml": POLICY.format(name="api", bake="5m"),
        },
    )
    broken = catalog.refresh()
    assert broken is not None and set(broken.policies) == {"shop", "api"}
    assert broken.policies["shop"].policy.spec.schedule.bake_time.total_seconds() == 300  # last good
    assert any("shop.yaml:5: spec.schedule.bakeTime" in str(e) for e in broken.errors)

    (tmp_path / "api.yaml").unlink()
    removed = catalog.refresh()
    assert removed is not None and set(removed.policies) == {"shop"}
