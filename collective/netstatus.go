package collective

import (
	"fmt"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Wire errors of the Link service. A receiver that ends a Link stream with
// an error says why in the stream's status: a code (FailedPrecondition for a
// stale generation, Aborted for a failed receiving rank, ...) and, where the
// sender must act on it, an errdetails.ErrorInfo whose Domain is
// statusDomain and whose Reason names the error class (abortClasses). The
// sender recovers the class from that detail, never from the message, which
// is for people.

// statusDomain is the ErrorInfo domain of the data plane's wire errors.
const statusDomain = "collective.gpumesh"

// linkStatus is the error a Link handler returns: code and msg, with class
// (an index of abortClasses) as an ErrorInfo detail.
func linkStatus(code codes.Code, class uint64, msg string) error {
	st := status.New(code, msg)
	if c := int(class); c < len(abortClasses) {
		if d, err := st.WithDetails(&errdetails.ErrorInfo{Domain: statusDomain, Reason: abortClasses[c].reason}); err == nil {
			st = d
		}
	}
	return st.Err()
}

// linkClass reads the status of an error that ended a Link stream: st is
// nil when err is not a gRPC status; ok says whether it names a class, and
// class is that class (an index of abortClasses; 0 for a reason this build
// does not know).
func linkClass(err error) (st *status.Status, class uint64, ok bool) {
	st, isStatus := status.FromError(err)
	if !isStatus {
		return nil, 0, false
	}
	for _, d := range st.Details() {
		info, isInfo := d.(*errdetails.ErrorInfo)
		if !isInfo || info.GetDomain() != statusDomain {
			continue
		}
		for i, c := range abortClasses {
			if c.reason == info.GetReason() {
				return st, uint64(i), true
			}
		}
		return st, 0, true
	}
	return st, 0, false
}

// streamErr maps the status that ended a link to our errors.
func streamErr(peer int, addr string, err error) error {
	if st, class, ok := linkClass(err); ok && abortClassErr(class) == ErrStaleGeneration {
		return fmt.Errorf("%w: rank %d at %s: %s", ErrStaleGeneration, peer, addr, st.Message())
	}
	return fmt.Errorf("%w: link to rank %d at %s ended: %v", ErrPeerFailed, peer, addr, err)
}
