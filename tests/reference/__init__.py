"""Oracles for the tests: independent transcriptions of what qvl must reproduce (never imported by qvl)."""
