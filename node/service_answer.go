package node

import (
	"bufio"
	"bytes"
	"net/http"
	"net/textproto"
	"strings"

	"golang.org/x/net/http/httpguts"
)

// The fast path's common answer, passed on without http.ReadResponse: its
// head is parsed where it lies in the connection's buffer, its headers go
// straight into the client's header map (one string for the whole head,
// one slice for all values), and its body is written from the buffer.
// Only an answer that needs nothing else is taken this way ("plain"):
//
//   - the whole head is already buffered;
//   - HTTP/1.1 with a final status from 200 to 599 other than 204 and 304,
//     to a request other than HEAD (so that its body is as long as
//     Content-Length says);
//   - exactly one Content-Length, of digits only, and no Transfer-Encoding
//     or Trailer (no chunks, no trailers);
//   - Connection holds nothing but close and keep-alive (no header it
//     names must be dropped);
//   - not a stream of server-sent events (those are flushed as they come);
//   - every header line is a valid name, a colon and a valid value, none
//     folded, at most maxPlainHeaders of them.
//
// Anything else is left in the buffer untouched for readFinal and
// copyAnswer, which handle every answer. What reaches the client is what
// copyAnswer sends: the status, the headers less the hop-by-hop ones, the
// body.

// maxPlainHeaders bounds the header lines of a plain answer (more go the
// general way).
const maxPlainHeaders = 32

// passPlainAnswer passes the answer at the head of br on to at if it is
// plain, and says so (ok) and whether the replica asked to close the
// connection. When ok is false nothing was read from br nor written to at.
// A failure once the answer has begun aborts the client's connection
// (http.ErrAbortHandler), as copyAnswer does.
func passPlainAnswer(at *attempt, br *bufio.Reader, req *http.Request) (ok, closeAfter bool) {
	if req.Method == http.MethodHead {
		return false, false
	}
	buf, _ := br.Peek(br.Buffered())
	end := bytes.Index(buf, []byte("\r\n\r\n"))
	if end < 0 {
		return false, false
	}
	var arr [maxPlainHeaders]plainField
	status, fields, length, closeAfter, ok := parsePlainHead(buf[:end+2], arr[:0])
	if !ok {
		return false, false
	}
	h := at.Header()
	values := make([]string, 0, len(fields))
	for _, f := range fields {
		if f.drop {
			continue
		}
		if vv, dup := h[f.key]; dup {
			h[f.key] = append(vv, f.value)
			continue
		}
		values = append(values, f.value)
		h[f.key] = values[len(values)-1 : len(values) : len(values)]
	}
	at.WriteHeader(status)
	headLen := end + 4
	inBuf := min(int64(len(buf)-headLen), length)
	if inBuf > 0 {
		if _, err := at.ResponseWriter.Write(buf[headLen : headLen+int(inBuf)]); err != nil {
			panic(http.ErrAbortHandler) // the client went away
		}
	}
	_, _ = br.Discard(headLen + int(inBuf)) // buffered: cannot fail
	if rest := length - inBuf; rest > 0 {
		copyBody(at, br, rest)
	}
	return true, closeAfter
}

// copyBody copies n more bytes of an answer's body from br to at.
func copyBody(at *attempt, br *bufio.Reader, n int64) {
	buf := copyBuffers.Get()
	defer copyBuffers.Put(buf)
	for n > 0 {
		m, rerr := br.Read(buf[:min(int64(len(buf)), n)])
		if m > 0 {
			if _, werr := at.ResponseWriter.Write(buf[:m]); werr != nil {
				panic(http.ErrAbortHandler) // the client went away
			}
			n -= int64(m)
		}
		if rerr != nil && n > 0 {
			panic(http.ErrAbortHandler) // the replica failed mid-answer
		}
	}
}

// plainField is one header line of a plain answer.
type plainField struct {
	key, value string
	drop       bool // hop-by-hop: not passed on
}

// parsePlainHead parses head (the status line and header lines, each
// ending in CRLF, without the blank line) into fields (appended to into,
// up to its capacity) and says whether the answer is plain (see above).
func parsePlainHead(head []byte, into []plainField) (status int, fields []plainField, length int64, closeAfter, ok bool) {
	const proto = "HTTP/1.1 "
	if !bytes.HasPrefix(head, []byte(proto)) || len(head) < len(proto)+5 {
		return 0, nil, 0, false, false
	}
	d := head[len(proto):]
	if !isDigit(d[0]) || !isDigit(d[1]) || !isDigit(d[2]) || (d[3] != ' ' && d[3] != '\r') {
		return 0, nil, 0, false, false
	}
	status = int(d[0]-'0')*100 + int(d[1]-'0')*10 + int(d[2]-'0')
	if status < 200 || status > 599 || status == http.StatusNoContent || status == http.StatusNotModified {
		return 0, nil, 0, false, false
	}
	eol := bytes.Index(head, []byte("\r\n"))
	if bytes.IndexByte(head[:eol], '\n') >= 0 {
		return 0, nil, 0, false, false
	}
	s := string(head[eol+2:]) // every key and value is a piece of this one string
	fields, length = into, -1
	for s != "" {
		line, rest, _ := strings.Cut(s, "\r\n")
		s = rest
		if len(fields) == cap(fields) || line == "" || line[0] == ' ' || line[0] == '\t' || strings.IndexByte(line, '\n') >= 0 {
			return 0, nil, 0, false, false // too many, folded, or a bare LF
		}
		k, v, found := strings.Cut(line, ":")
		v = textproto.TrimString(v)
		if !found || !httpguts.ValidHeaderFieldName(k) || !httpguts.ValidHeaderFieldValue(v) {
			return 0, nil, 0, false, false
		}
		k = textproto.CanonicalMIMEHeaderKey(k) // k itself when already canonical
		f := plainField{key: k, value: v, drop: hopByHop[k]}
		switch k {
		case "Content-Length":
			if length >= 0 || v == "" || len(v) > 18 {
				return 0, nil, 0, false, false
			}
			length = 0
			for i := 0; i < len(v); i++ {
				if !isDigit(v[i]) {
					return 0, nil, 0, false, false
				}
				length = length*10 + int64(v[i]-'0')
			}
		case "Transfer-Encoding", "Trailer":
			return 0, nil, 0, false, false
		case "Connection":
			for _, tok := range strings.Split(v, ",") {
				switch tok = textproto.TrimString(tok); {
				case strings.EqualFold(tok, "close"):
					closeAfter = true
				case strings.EqualFold(tok, "keep-alive"), tok == "":
				default:
					return 0, nil, 0, false, false // it names a header to drop
				}
			}
		case "Content-Type":
			if isEventStream(v) {
				return 0, nil, 0, false, false
			}
		}
		fields = append(fields, f)
	}
	if length < 0 {
		return 0, nil, 0, false, false
	}
	return status, fields, length, closeAfter, true
}

func isDigit(b byte) bool { return '0' <= b && b <= '9' }
