"""Language id: fastText per caption with a script cross-check (langid), lingua's second opinion."""
