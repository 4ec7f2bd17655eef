"""`qvl curate`: web image-text pairs to a clean, balanced subset, then its images. The stages, in order:

sources/  read raw shards (parquet, jsonl, csv, tsv) and recognise their layout: canonical batches
lang/     language id: fastText with a script cross-check, lingua's second opinion on doubtful captions
filter/   the rules, dedup and balance over all shards (engines: local or Ray); report, ledger, replay
images/   download the kept pairs' images, check their pixels and addresses; CLIP scores
why.py    one pair's story through every stage (settings.py: the options all stages read)
"""
