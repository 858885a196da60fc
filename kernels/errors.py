"""The one exception type of the kernels: inputs or backend requests they cannot serve."""


class KernelError(Exception):
    """A kernel call that cannot run as asked. The message names the call, the offending value and the fix."""
