"""The buffer sizes of the request path, and how they relate.

A body piece, an output chunk and a pipe's worth of input are one unit,
:data:`CHUNK_SIZE`: Tornado reads request bodies in pieces of it, the gzip
decoder inflates at most it at a time, git's stdin pipe holds one piece, and
the relay sends git's output in chunks of at most it.  git's stdout pipe is
larger (:data:`STDOUT_PIPE_SIZE`) so that git can write on while the relay
pauses to let output gather (see ``relay.py``).  All were measured
(``docs/benchmarks.md``).
"""

#: The unit every stage of the request path moves at once.
CHUNK_SIZE = 256 * 1024
#: Kernel buffer of the pipe from git's stdout (Linux's default is 64 KiB): git keeps writing while
#: the loop serves other requests or pauses to let output gather.
STDOUT_PIPE_SIZE = 1024 * 1024
#: Output git writes before its response may start (while the request body still flows) is kept in
#: memory up to this many bytes, beyond that in a temporary file.
HOLD_IN_MEMORY = 64 * 1024
