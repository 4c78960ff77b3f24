"""Pure domain logic of Corral: entities, sizes, and the policies that return decisions; no I/O."""
