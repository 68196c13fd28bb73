"""The limits of the ZeroMQ messages: the one place they are set (layout.py, imports.py, the refit plans read them)."""

MAX_FRAME_BYTES = 32 << 20  # the largest frame any message type may have (a 32k-tensor layout)
SMALL_FRAME = 64 << 10  # a frame up to this size is decoded in one pass (it holds at most this many values)
MAX_NAME_CHARS = 512
MAX_ENTRIES = 1 << 15  # tensors in one slab layout
MAX_DIMS = 8  # dimensions of one tensor
MAX_KNOWN = 64  # slab ids / layout digests a fetch request may list
MAX_KNOWN_CONFIGS = 16
MAX_VERSIONS_LISTED = 1024
MAX_SETS_LISTED = 4096
MAX_LIVE_SLABS = 4096
MAX_NOTED_FETCHES = 64  # board fetches one FetchNote tells
MAX_BYTE_OFFSET = 1 << 62
MAX_CONFIG_NODES = 4096
MAX_STATUS_LEASES = 100  # leases listed one by one in a status report (all are counted)
MAX_TREE_DEPTH = 8
MAX_TREE_CHARS = 4096
#: encoded bytes of one tree in a frame over SMALL_FRAME (checked before the tree is built: a frame of
#: nested empty arrays would otherwise cost a Python object per byte)
MAX_CONFIG_BYTES = 1 << 20
MAX_ERROR_CHARS = 4000  # an ErrorReply's message
MAX_ERROR_CODE_CHARS = 64  # an error code: a class name (tags.py)
I64 = (1 << 63) - 1
