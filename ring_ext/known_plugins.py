"""Which ring-ext distribution provides which policy loss, trainer mode or weight-sync backend.

The one place the core names plugins: the start-up checks, the recipes' resolvers and the pipeline read it to
tell a user which distribution to install. What a plugin registers lives in the plugin (`ring_ext_register`);
`tests/test_discovery.py` checks that the installed plugins register exactly what this table says.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Literal

Kind = Literal["policy_loss", "trainer_mode", "checkpoint_engine", "platform"]


@dataclass(frozen=True)
class KnownPlugin:
    distribution: str  # what `pip install` takes
    module: str  # its top-level package
    provides: tuple[tuple[Kind, str], ...]

    @property
    def directory(self) -> str:
        return f"plugins/{self.distribution.removeprefix('ring-ext-')}"

    def installed(self) -> bool:
        return importlib.util.find_spec(self.module) is not None  # looked up per call: tests stand in for it

    def install_hint(self) -> str:
        return f"pip install {self.distribution} (in this repository: pip install -e {self.directory})"


KNOWN_PLUGINS: tuple[KnownPlugin, ...] = (
    KnownPlugin("ring-ext-icepop", "ring_ext_icepop",
                tuple(("policy_loss", name) for name in ("icepop", "kpop", "tis", "seq_geo", "seq_max",
                                                          "seq_max_icepop", "seq_geo_tis"))),
    KnownPlugin("ring-ext-c3po", "ring_ext_c3po", (("trainer_mode", "c3po"),)),
    KnownPlugin("ring-ext-astate", "ring_ext_astate", (("checkpoint_engine", "astate"),)),
    KnownPlugin("ring-ext-cpu", "ring_ext_cpu", (("platform", "cpu"),)),
)


def provider(kind: Kind, name: str) -> KnownPlugin | None:
    """The distribution that provides `name` of `kind`, or None if no ring-ext plugin does."""
    return next((p for p in KNOWN_PLUGINS if (kind, name) in p.provides), None)


def by_distribution(distribution: str) -> KnownPlugin:
    found = next((p for p in KNOWN_PLUGINS if p.distribution == distribution), None)
    if found is None:
        raise KeyError(f"{distribution} is not a ring-ext plugin; known: {[p.distribution for p in KNOWN_PLUGINS]}")
    return found


def require(kind: Kind, name: str, setting: str, alternative: str = "") -> None:
    """Raise naming the distribution to install when `name` comes with a ring-ext plugin that is not installed;
    `alternative` is the setting that avoids needing it."""
    plugin = provider(kind, name)
    if plugin is None or plugin.installed():
        return
    if alternative:
        raise ValueError(f"{setting}: pip install {plugin.distribution}, or {alternative} "
                         f"(in this repository: pip install -e {plugin.directory})")
    raise ValueError(f"{setting} comes with the plugin {plugin.distribution}, which is not installed: "
                     f"{plugin.install_hint()}")
