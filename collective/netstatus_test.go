package collective

import (
	"errors"
	"fmt"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Every error class survives the status that ends a Link stream, read from
// its detail and not from its text; statuses without the detail name none.
func TestLinkStatusCarriesClass(t *testing.T) {
	for i, c := range abortClasses {
		err := linkStatus(codes.Aborted, uint64(i), "some text that names no class")
		st, class, ok := linkClass(err)
		if !ok || class != uint64(i) || st.Code() != codes.Aborted || st.Message() != "some text that names no class" {
			t.Fatalf("class %d (%s): got class %d ok %v status %v", i, c.reason, class, ok, st)
		}
	}
	for _, err := range []error{
		status.Error(codes.FailedPrecondition, "collective: stale generation 1 of job \"j\" refused"),
		errors.New("not a status"),
	} {
		if _, class, ok := linkClass(err); ok {
			t.Fatalf("%v: names class %d", err, class)
		}
	}
}

func TestStreamErrStaleGenerationByClass(t *testing.T) {
	stale := linkStatus(codes.FailedPrecondition, abortClassOf(ErrStaleGeneration), "refused")
	if err := streamErr(1, "127.0.0.1:1", stale); !errors.Is(err, ErrStaleGeneration) {
		t.Fatalf("stale class: %v", err)
	}
	// The old text without the class is a broken link, not a stale generation.
	text := status.Error(codes.FailedPrecondition, "collective: stale generation 1 of job \"j\" refused")
	if err := streamErr(1, "127.0.0.1:1", text); errors.Is(err, ErrStaleGeneration) || !errors.Is(err, ErrPeerFailed) {
		t.Fatalf("text only: %v", err)
	}
	wrapped := fmt.Errorf("open: %w", linkStatus(codes.Aborted, abortClassOf(ErrMismatch), "m"))
	if _, class, ok := linkClass(wrapped); !ok || abortClassErr(class) != ErrMismatch {
		t.Fatalf("wrapped status: class %d ok %v", class, ok)
	}
}
