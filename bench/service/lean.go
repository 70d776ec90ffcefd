package main

import (
	"bufio"
	"bytes"
	"context"
	"net"
	"net/http"
	"net/textproto"
	"net/url"
	"strconv"
	"strings"
	"time"
)

// serveLean serves h on listen with about the least an HTTP/1.1 server
// must do for the benchmark's requests, as a measuring stick for what the
// router would cost on a leaner server side than net/http's (router
// -lean), not a server to deploy. Per request it parses the head where it
// lies in the buffer (one string for all of it), gives the handler a
// cancellable context and arms a timer that would start watching the
// client after watchAfter (what a real server needs to notice a client
// that went away during a slow answer; the watch itself is not built),
// and writes the gathered answer (status, headers, Content-Length, body)
// in one write. No streaming, 1xx, trailers, bodies, timeouts or limits.
func serveLean(listen string, h http.Handler) error {
	return serveEach(listen, func(c net.Conn) { leanConn(c, h) })
}

// watchAfter is how long an answer may take before a real server would
// start watching its client.
const watchAfter = 50 * time.Millisecond

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
	watch := time.AfterFunc(time.Hour, func() {})
	watch.Stop()
	for {
		req, err := leanRequest(br)
		if err != nil {
			return
		}
		req.RemoteAddr = remote
		ctx, cancel := context.WithCancel(context.Background())
		req = req.WithContext(ctx)
		clear(w.header)
		w.status = 0
		w.body.Reset()
		watch.Reset(watchAfter)
		h.ServeHTTP(w, req)
		watch.Stop()
		cancel()
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

// leanRequest reads one body-less request whose head fits the buffer.
func leanRequest(br *bufio.Reader) (*http.Request, error) {
	if _, err := br.Peek(1); err != nil {
		return nil, err
	}
	buf, _ := br.Peek(br.Buffered())
	end := bytes.Index(buf, []byte("\r\n\r\n"))
	for end < 0 {
		if br.Buffered() == br.Size() {
			return nil, errLeanHead
		}
		if _, err := br.Peek(br.Buffered() + 1); err != nil {
			return nil, err
		}
		buf, _ = br.Peek(br.Buffered())
		end = bytes.Index(buf, []byte("\r\n\r\n"))
	}
	s := string(buf[:end+2])
	_, _ = br.Discard(end + 4)
	line, s, _ := strings.Cut(s, "\r\n")
	method, rest, ok1 := strings.Cut(line, " ")
	target, proto, ok2 := strings.Cut(rest, " ")
	if !ok1 || !ok2 || proto != "HTTP/1.1" {
		return nil, errLeanHead
	}
	u, err := url.ParseRequestURI(target)
	if err != nil {
		return nil, err
	}
	req := &http.Request{Method: method, URL: u, Proto: proto, ProtoMajor: 1, ProtoMinor: 1,
		Header: make(http.Header, 8), Body: http.NoBody, RequestURI: target}
	for s != "" {
		var l string
		l, s, _ = strings.Cut(s, "\r\n")
		k, v, ok := strings.Cut(l, ":")
		if !ok {
			return nil, errLeanHead
		}
		k = textproto.CanonicalMIMEHeaderKey(k)
		v = textproto.TrimString(v)
		if k == "Host" {
			req.Host = v
			continue
		}
		if k == "Content-Length" || k == "Transfer-Encoding" {
			return nil, errLeanHead // no bodies here
		}
		req.Header[k] = append(req.Header[k], v)
	}
	return req, nil
}

var errLeanHead = &textproto.Error{Code: http.StatusBadRequest, Msg: "not a request the lean server takes"}
