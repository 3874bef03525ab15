"""The fused ops inside other libraries' losses, for users who already train with them.

- :mod:`misa_fast.integrations.torchrl`: TorchRL's ``CQLLoss`` with its log-sum-exp computed by
  :func:`misa_fast.ops.sampled_q_log_mean_exp` on TorchRL's own Q-value network
  (``pip install "misa-fast[torchrl]"``).

Each integration imports its library only when it is itself imported, so this package costs nothing
to users of the others.
"""
