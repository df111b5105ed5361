"""Teacher-data shards: the format (`shards`, shared with `data_pipeline`) and the training reader."""

from gd_train.data.reader import Batch, ShardReader
from gd_train.data.shards import (
    MANIFEST_NAME,
    SHARD_NAME,
    Manifest,
    ShardFormatError,
    ShardRecord,
    TeacherSample,
    decode_sample,
    encode_sample,
    write_shard,
)

__all__ = ["Batch", "ShardReader", "MANIFEST_NAME", "SHARD_NAME", "Manifest", "ShardFormatError", "ShardRecord",
           "TeacherSample", "decode_sample", "encode_sample", "write_shard"]
