"""Target of ring-ext's `verl.plugins` entry point: verl imports it in every process it starts."""

from ring_ext.discovery import load_plugins
from ring_ext.resolvers import register_resolvers

register_resolvers()
load_plugins()
