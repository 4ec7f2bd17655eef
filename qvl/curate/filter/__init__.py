"""The filter run: rules, dedup, balance on an engine (local or Ray); its report, stats and replay."""
