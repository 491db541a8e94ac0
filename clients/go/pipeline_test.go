package ringcache

import (
	"testing"

	"google.golang.org/grpc/codes"
)

func TestCanonicalCodeNames(t *testing.T) {
	for code, want := range map[codes.Code]string{
		codes.OK:                "OK",
		codes.InvalidArgument:   "INVALID_ARGUMENT",
		codes.Canceled:          "CANCELLED",
		codes.DeadlineExceeded:  "DEADLINE_EXCEEDED",
		codes.ResourceExhausted: "RESOURCE_EXHAUSTED",
	} {
		if got := canonical(code); got != want {
			t.Errorf("%v: %q, want %q", code, got, want)
		}
	}
}
