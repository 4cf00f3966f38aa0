"""`echo`: the smallest Python step; returns its input unchanged. Used to
measure the per-call overhead of a Python component (new store, instantiate,
call), next to the Rust and JavaScript echo guests."""

import wit_world


class WitWorld(wit_world.WitWorld):
    def run(self, input: str) -> str:
        return input
