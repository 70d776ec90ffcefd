package main

import (
	"net"
)

// relay is what any proxy must do at least, with nothing of HTTP: each
// client connection gets its own connection to the replica, and one
// goroutine passes what one read of the client returns to the replica,
// then what one read of the replica returns back, in turn. It is right
// only when every request and every answer arrives in one read (small
// GETs and the Go replica's 1 KiB answers on loopback; not
// examples/service/server.py, which writes head and body apart): a measuring
// stick for the router's cost (two reads and two writes per request), not
// a proxy.
func relay(listen, replica string) error {
	return serveEach(listen, func(c net.Conn) {
		defer c.Close()
		up, err := net.Dial("tcp", replica)
		if err != nil {
			return
		}
		defer up.Close()
		in, out := make([]byte, 16<<10), make([]byte, 16<<10)
		for {
			n, err := c.Read(in)
			if err != nil {
				return
			}
			if _, err := up.Write(in[:n]); err != nil {
				return
			}
			m, err := up.Read(out)
			if err != nil {
				return
			}
			if _, err := c.Write(out[:m]); err != nil {
				return
			}
		}
	})
}

// serveEach listens on listen and runs handle on its own goroutine for
// every connection accepted, until Accept fails.
func serveEach(listen string, handle func(net.Conn)) error {
	ln, err := net.Listen("tcp", listen)
	if err != nil {
		return err
	}
	for {
		c, err := ln.Accept()
		if err != nil {
			return err
		}
		go handle(c)
	}
}
