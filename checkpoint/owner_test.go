package checkpoint_test

import (
	"errors"
	"strings"
	"testing"

	"github.com/gpumesh/gpumesh/checkpoint"
)

func TestOwnerCheck(t *testing.T) {
	train := checkpoint.Manifest{Step: 7, Job: "train-1a2b3c4d", JobName: "train"}
	old := checkpoint.Manifest{Step: 7, Job: "train-1a2b3c4d"} // before names were recorded
	for _, tc := range []struct {
		what  string
		owner checkpoint.Owner
		m     checkpoint.Manifest
		want  checkpoint.Verdict
		other bool
	}{
		{"another generation or submission of the same name", checkpoint.Owner{Name: "train", ID: "train-99999999"}, train, checkpoint.Own, false},
		{"another job", checkpoint.Owner{Name: "eval", ID: "eval-00000001"}, train, checkpoint.Refused, true},
		{"another job, resumed from by name", checkpoint.Owner{Name: "eval", ID: "eval-00000001", ResumeFrom: "train"}, train, checkpoint.Own, false},
		{"another job, resumed from by ID", checkpoint.Owner{Name: "eval", ID: "eval-00000001", ResumeFrom: "train-1a2b3c4d"}, train, checkpoint.Own, false},
		{"resume_from names a third job", checkpoint.Owner{Name: "eval", ID: "eval-00000001", ResumeFrom: "bench"}, train, checkpoint.Refused, true},
		{"an old manifest of the same submission", checkpoint.Owner{Name: "x", ID: "train-1a2b3c4d"}, old, checkpoint.Own, false},
		{"an old manifest of another", checkpoint.Owner{Name: "eval", ID: "eval-00000001"}, old, checkpoint.Unowned, false},
		{"written outside a job", checkpoint.Owner{Name: "eval", ID: "eval-00000001"}, checkpoint.Manifest{Step: 7}, checkpoint.Unowned, false},
		{"used outside a job", checkpoint.Owner{}, train, checkpoint.Own, false},
	} {
		v, err := tc.owner.Check(tc.m)
		if tc.other {
			if v != checkpoint.Refused {
				t.Errorf("%s: verdict %s with a refusal, want %s", tc.what, v, checkpoint.Refused)
			}
			if !errors.Is(err, checkpoint.ErrOtherJob) || !strings.Contains(err.Error(), `job "train" (ID train-1a2b3c4d)`) ||
				!strings.Contains(err.Error(), `job "eval" (ID eval-00000001)`) || !strings.Contains(err.Error(), "resume_from: train") {
				t.Errorf("%s: %v", tc.what, err)
			}
			continue
		}
		if err != nil || v != tc.want {
			t.Errorf("%s: verdict %s, %v; want %s", tc.what, v, err, tc.want)
		}
	}
}
