"""Raw shards to canonical batches: what each input file is (shards), and its rows read (readers)."""
