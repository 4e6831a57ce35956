"""Speed tricks. Each keeps the plain path's results; each is tested against it."""
