"""Label shards: writer.py writes them (ShardFile, ShardWriter, the manifest's
shard list), reader.py reads them back (ShardReader). The layout itself lives
in labelgen/format/."""

from labelgen.shards.reader import ShardReader
from labelgen.shards.writer import (ShardFile, ShardInfo, ShardWriter, build_manifest, shard_counts,
                                    shard_info_from_file)

__all__ = ["ShardReader", "ShardFile", "ShardInfo", "ShardWriter", "build_manifest", "shard_counts",
           "shard_info_from_file"]
