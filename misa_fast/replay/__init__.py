"""The C++ replay buffer's Python side and the batch sources the trainer draws from."""
