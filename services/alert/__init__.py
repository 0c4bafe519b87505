"""The alert service: patient and device alerts, and the threshold rules that raise them on ingest."""
