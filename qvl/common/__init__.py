"""What every room uses: atomic writes and temp-folder-then-swap (storage), progress bars
(progress), image size limits (pixels), row-id file names (inputs), workers that die with their
parent (lifeline)."""
