"""Teacher-student schemes beyond one frozen teacher: each one a module, found by its name."""
