"""Pure logic: no sockets, files, serial ports or event loops are imported here."""
