"""The write-ahead log of Decision Provenance Records: records, chain, checkpoints, stores, verification."""
