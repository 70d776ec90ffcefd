package node

import (
	"bufio"
	"fmt"
	"net/http"
	"net/textproto"
	"strconv"
	"strings"
	"time"

	"golang.org/x/net/http/httpguts"
)

// serveWriter is the serve port's http.ResponseWriter: one per connection,
// reset for each request. It frames an answer as net/http's server does
// for HTTP/1.1:
//
//   - interim 1xx answers (but 101) go out at once, with the headers set
//     so far;
//   - an answer whose handler set Content-Length is written as it comes,
//     its head gathered with the first body bytes (an answer that fits the
//     connection's buffer leaves in one write when the handler returns);
//   - one without a length is held up to bufferBeforeChunking bytes: if the
//     handler returns first it gets a Content-Length, else (or on Flush) it
//     is sent chunked, and trailers (announced in Trailer, or under
//     http.TrailerPrefix) follow the last chunk;
//   - Date is added when absent, Content-Type sniffed from the first bytes
//     when absent, HEAD and 204/304 answers carry no body, and a body
//     shorter than its Content-Length closes the connection.
type serveWriter struct {
	bw         *bufio.Writer
	header     http.Header
	isHead     bool
	status     int // the final status; 0 before WriteHeader
	headSent   bool
	chunked    bool
	length     int64 // Content-Length as declared or computed; -1 unknown
	written    int64
	pending    []byte // body held while the length is unknown and the head not sent
	closeAfter bool   // close the connection after this answer
	err        error  // the first write error on the connection
	scratch    []byte
	// date is the Date line of the second dateSec (Unix time), kept for
	// the answers of that second.
	date    []byte
	dateSec int64
}

// bufferBeforeChunking is how much of an answer of unknown length is held
// before it is sent chunked (net/http's own figure).
const bufferBeforeChunking = 2048

// reset prepares w for the next request.
func (w *serveWriter) reset(method string, closeAfter bool) {
	clear(w.header)
	w.isHead = method == http.MethodHead
	w.status, w.headSent, w.chunked = 0, false, false
	w.length, w.written = -1, 0
	w.pending = w.pending[:0]
	w.closeAfter = closeAfter
}

func (w *serveWriter) Header() http.Header { return w.header }

func (w *serveWriter) WriteHeader(code int) {
	if w.status != 0 {
		return // superfluous, as net/http (which also logs it)
	}
	if code < 100 || code > 999 {
		panic(fmt.Sprintf("invalid WriteHeader code %v", code))
	}
	if code < 200 && code != http.StatusSwitchingProtocols {
		w.writeInterim(code)
		return
	}
	w.status = code
	if cl := w.header.Get("Content-Length"); cl != "" {
		if n, err := strconv.ParseInt(cl, 10, 64); err == nil && n >= 0 {
			w.length = n
		} else {
			w.header.Del("Content-Length")
		}
	}
}

// writeInterim sends a 1xx answer with the headers set so far.
func (w *serveWriter) writeInterim(code int) {
	if w.err != nil {
		return
	}
	w.statusLine(code)
	for k, vv := range w.header {
		if k != "Content-Length" && k != "Transfer-Encoding" {
			w.headerLines(k, vv)
		}
	}
	w.bw.WriteString("\r\n")
	w.fail(w.bw.Flush())
}

func (w *serveWriter) Write(p []byte) (int, error) {
	if w.status == 0 {
		w.WriteHeader(http.StatusOK)
	}
	if w.err != nil {
		return 0, w.err
	}
	if !bodyAllowed(w.status) {
		return 0, http.ErrBodyNotAllowed
	}
	if w.length >= 0 && w.written+int64(len(p)) > w.length {
		return 0, http.ErrContentLength
	}
	w.written += int64(len(p))
	if !w.headSent {
		if w.length < 0 && len(w.pending)+len(p) <= bufferBeforeChunking {
			w.pending = append(w.pending, p...)
			return len(p), nil
		}
		w.sendHead(false, p)
	}
	w.body(p)
	if w.err != nil {
		return 0, w.err
	}
	return len(p), nil
}

// Flush sends what the handler wrote so far (the head first, chunked when
// its length is unknown).
func (w *serveWriter) Flush() {
	if w.status == 0 {
		w.WriteHeader(http.StatusOK)
	}
	if !w.headSent {
		w.sendHead(false, nil)
	}
	if w.err == nil {
		w.fail(w.bw.Flush())
	}
}

// finish ends the answer when the handler has returned (without flushing
// the connection's buffer).
func (w *serveWriter) finish() {
	if w.status == 0 {
		w.WriteHeader(http.StatusOK)
	}
	if !w.headSent {
		w.sendHead(true, nil)
	}
	if w.err != nil {
		return
	}
	if w.chunked {
		w.bw.WriteString("0\r\n")
		w.trailers()
		w.bw.WriteString("\r\n")
	}
	if !w.isHead && bodyAllowed(w.status) && w.length >= 0 && w.written != w.length {
		w.closeAfter = true // the client waits for bytes that will never come
	}
}

// sendHead writes the status line and headers, then what was held of the
// body. done says the handler has returned; first is the body bytes about
// to be written (Content-Type is sniffed from what is held, else them).
func (w *serveWriter) sendHead(done bool, first []byte) {
	w.headSent = true
	h := w.header
	if w.length < 0 && bodyAllowed(w.status) {
		_, announced := h["Trailer"]
		switch {
		case done && !announced && !hasPrefixedTrailer(h) && (!w.isHead || len(w.pending) > 0):
			w.length = int64(len(w.pending))
			w.written = w.length
			h["Content-Length"] = []string{strconv.Itoa(len(w.pending))}
		case !w.isHead:
			w.chunked = true
		}
	}
	if _, ok := h["Content-Type"]; !ok && bodyAllowed(w.status) {
		sniff := w.pending
		if len(sniff) == 0 {
			sniff = first
		}
		if len(sniff) > 0 {
			h["Content-Type"] = []string{http.DetectContentType(sniff)}
		}
	}
	if httpguts.HeaderValuesContainsToken(h["Connection"], "close") {
		w.closeAfter = true
	}
	if w.err != nil {
		return
	}
	w.statusLine(w.status)
	for k, vv := range h {
		switch {
		case k == "Transfer-Encoding", strings.HasPrefix(k, http.TrailerPrefix):
		case k == "Content-Length" && w.chunked:
		default:
			w.headerLines(k, vv)
		}
	}
	if _, ok := h["Date"]; !ok {
		if now := time.Now(); now.Unix() != w.dateSec || w.date == nil {
			w.dateSec = now.Unix()
			w.date = append(now.UTC().AppendFormat(append(w.date[:0], "Date: "...), http.TimeFormat), '\r', '\n')
		}
		w.bw.Write(w.date)
	}
	if w.chunked {
		w.bw.WriteString("Transfer-Encoding: chunked\r\n")
	}
	if w.closeAfter && !httpguts.HeaderValuesContainsToken(h["Connection"], "close") {
		w.bw.WriteString("Connection: close\r\n")
	}
	w.bw.WriteString("\r\n")
	if len(w.pending) > 0 {
		w.body(w.pending)
		w.pending = w.pending[:0]
	}
}

// body writes p, framed (not for HEAD).
func (w *serveWriter) body(p []byte) {
	if w.isHead || len(p) == 0 || w.err != nil {
		return
	}
	if w.chunked {
		w.scratch = append(strconv.AppendInt(w.scratch[:0], int64(len(p)), 16), '\r', '\n')
		w.bw.Write(w.scratch)
		w.bw.Write(p)
		_, err := w.bw.WriteString("\r\n")
		w.fail(err)
		return
	}
	_, err := w.bw.Write(p)
	w.fail(err)
}

// trailers writes the trailers: those Trailer announced, then those set
// under http.TrailerPrefix.
func (w *serveWriter) trailers() {
	h := w.header
	for _, v := range h["Trailer"] {
		for _, k := range strings.Split(v, ",") {
			if k = textproto.CanonicalMIMEHeaderKey(textproto.TrimString(k)); k != "" {
				w.headerLines(k, h[k])
			}
		}
	}
	for k, vv := range h {
		if name, ok := strings.CutPrefix(k, http.TrailerPrefix); ok {
			w.headerLines(name, vv)
		}
	}
}

func (w *serveWriter) statusLine(code int) {
	w.scratch = strconv.AppendInt(append(w.scratch[:0], "HTTP/1.1 "...), int64(code), 10)
	w.scratch = append(w.scratch, ' ')
	if text := http.StatusText(code); text != "" {
		w.scratch = append(w.scratch, text...)
	} else {
		w.scratch = strconv.AppendInt(append(w.scratch, "status code "...), int64(code), 10)
	}
	w.scratch = append(w.scratch, '\r', '\n') // kept: its capacity serves the next answers
	w.bw.Write(w.scratch)
}

// headerLines writes k's values, as net/http does: an invalid name is
// dropped, line breaks in a value become spaces.
func (w *serveWriter) headerLines(k string, vv []string) {
	if !httpguts.ValidHeaderFieldName(k) {
		return
	}
	for _, v := range vv {
		if strings.ContainsAny(v, "\r\n") {
			v = strings.NewReplacer("\r", " ", "\n", " ").Replace(v)
		}
		w.bw.WriteString(k)
		w.bw.WriteString(": ")
		w.bw.WriteString(textproto.TrimString(v))
		w.bw.WriteString("\r\n")
	}
}

func (w *serveWriter) fail(err error) {
	if err != nil && w.err == nil {
		w.err = err
	}
}

// bodyAllowed says whether an answer of status may carry a body.
func bodyAllowed(status int) bool {
	return status >= 200 && status != http.StatusNoContent && status != http.StatusNotModified
}

func hasPrefixedTrailer(h http.Header) bool {
	for k := range h {
		if strings.HasPrefix(k, http.TrailerPrefix) {
			return true
		}
	}
	return false
}

var _ http.Flusher = (*serveWriter)(nil)
