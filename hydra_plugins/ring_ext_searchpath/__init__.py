"""Hydra search-path plugin: makes `+recipe=...` resolve from ring-ext's installed config directory.

Hydra imports every module under the `hydra_plugins` namespace package before composing; this one
must not import verl (it runs before verl's entry point) and stays cheap.
"""

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin

from ring_ext.resolvers import register_resolvers

CONFIG_PACKAGE = "pkg://ring_ext.hydra_conf"


class RingExtSearchPathPlugin(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        register_resolvers()
        search_path.append(provider="ring-ext", path=CONFIG_PACKAGE)
