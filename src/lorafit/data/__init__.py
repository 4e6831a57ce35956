"""Reading users' data: table readers (CSV/TSV/JSON/JSONL/Parquet, hub datasets), classification data, chat and LM data."""
