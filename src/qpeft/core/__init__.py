"""The machinery every part uses: wrappers by composition, the wrapper registry, the mode log,
name patterns and all-or-nothing model changes. Imports nothing else from qpeft."""
