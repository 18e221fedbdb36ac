"""Wire format, codecs, links and DHT membership (the daemon's network side)."""
