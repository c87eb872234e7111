"""One module per device kind; each driver is a small class that feeds events to the buffer."""
