package main

import (
	"bufio"
	"bytes"
	"net"
	"net/http"
	"strconv"
)

// serveLean serves h on listen with the least an HTTP/1.1 server can do
// for the benchmark's requests: http.ReadRequest, then the handler with a
// writer that gathers the answer and writes it whole (status, headers,
// Content-Length, body) in one write; no background read, no per-request
// context, no timeouts, no streaming, no 1xx, no trailers. It is a
// measuring stick for what the router would cost on a leaner server side
// than net/http's (router -lean), not a server to deploy.
func serveLean(listen string, h http.Handler) error {
	ln, err := net.Listen("tcp", listen)
	if err != nil {
		return err
	}
	for {
		c, err := ln.Accept()
		if err != nil {
			return err
		}
		go leanConn(c, h)
	}
}

// leanWriter gathers one answer.
type leanWriter struct {
	header http.Header
	status int
	body   bytes.Buffer
}

func (w *leanWriter) Header() http.Header { return w.header }

func (w *leanWriter) WriteHeader(code int) {
	if w.status == 0 {
		w.status = code
	}
}

func (w *leanWriter) Write(p []byte) (int, error) {
	if w.status == 0 {
		w.status = http.StatusOK
	}
	return w.body.Write(p)
}

func leanConn(c net.Conn, h http.Handler) {
	defer c.Close()
	br := bufio.NewReaderSize(c, 4<<10)
	bw := bufio.NewWriterSize(c, 4<<10)
	w := &leanWriter{header: http.Header{}}
	remote := c.RemoteAddr().String()
	for {
		req, err := http.ReadRequest(br)
		if err != nil {
			return
		}
		req.RemoteAddr = remote
		clear(w.header)
		w.status = 0
		w.body.Reset()
		h.ServeHTTP(w, req)
		if w.status == 0 {
			w.status = http.StatusOK
		}
		bw.WriteString("HTTP/1.1 ")
		bw.WriteString(strconv.Itoa(w.status))
		bw.WriteString(" ")
		bw.WriteString(http.StatusText(w.status))
		bw.WriteString("\r\n")
		w.header.Del("Content-Length")
		for k, vv := range w.header {
			for _, v := range vv {
				bw.WriteString(k)
				bw.WriteString(": ")
				bw.WriteString(v)
				bw.WriteString("\r\n")
			}
		}
		bw.WriteString("Content-Length: ")
		bw.WriteString(strconv.Itoa(w.body.Len()))
		bw.WriteString("\r\n\r\n")
		bw.Write(w.body.Bytes())
		if bw.Flush() != nil {
			return
		}
	}
}
