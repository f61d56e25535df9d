"""The training spine shared by every model: state, optimizer, jitted step, checkpoints, loop."""
