package deploy

import (
	"encoding/json"
	"reflect"
	"strings"
	"testing"

	"github.com/aws/aws-sdk-go-v2/service/ec2"
)

type policyDoc struct {
	Version   string
	Statement []struct {
		Sid       string
		Effect    string
		Action    json.RawMessage
		Resource  json.RawMessage
		Condition map[string]map[string]json.RawMessage
	}
}

func policyActions(t *testing.T) (map[string]string, policyDoc) {
	t.Helper()
	var doc policyDoc
	dec := json.NewDecoder(strings.NewReader(IAMPolicy))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&doc); err != nil {
		t.Fatalf("iam-policy.json is not a valid policy document: %v", err)
	}
	if doc.Version != "2012-10-17" {
		t.Fatalf("policy version %q", doc.Version)
	}
	actions := map[string]string{} // action → Sid
	sids := map[string]bool{}
	for _, s := range doc.Statement {
		if s.Sid == "" || sids[s.Sid] {
			t.Fatalf("statement without a unique Sid: %q", s.Sid)
		}
		sids[s.Sid] = true
		if s.Effect != "Allow" {
			t.Fatalf("%s: effect %q", s.Sid, s.Effect)
		}
		if len(s.Resource) == 0 {
			t.Fatalf("%s has no Resource", s.Sid)
		}
		var list []string
		if err := json.Unmarshal(s.Action, &list); err != nil {
			var one string
			if err := json.Unmarshal(s.Action, &one); err != nil {
				t.Fatalf("%s: Action is neither a string nor a list", s.Sid)
			}
			list = []string{one}
		}
		for _, a := range list {
			if strings.Contains(a, "*") {
				t.Fatalf("%s: wildcard action %q is not least privilege", s.Sid, a)
			}
			actions[a] = s.Sid
		}
	}
	return actions, doc
}

// Every EC2 API the code calls is in the policy: the interfaces below list
// exactly the methods the package calls on the EC2 client.
func TestIAMPolicyCoversEveryCall(t *testing.T) {
	actions, _ := policyActions(t)
	ifaces := []reflect.Type{
		reflect.TypeOf((*LaunchAPI)(nil)).Elem(),
		reflect.TypeOf((*FleetAPI)(nil)).Elem(),
		reflect.TypeOf((*ec2.DescribeInstancesAPIClient)(nil)).Elem(),
	}
	called := map[string]bool{}
	for _, it := range ifaces {
		for i := 0; i < it.NumMethod(); i++ {
			called["ec2:"+it.Method(i).Name] = true
		}
	}
	// CreateFleet launches and tags instances with the caller's rights and
	// passes the template's instance role.
	for _, a := range []string{"ec2:RunInstances", "ec2:CreateTags", "iam:PassRole"} {
		called[a] = true
	}
	for a := range called {
		if _, ok := actions[a]; !ok {
			t.Errorf("the code calls %s but iam-policy.json does not allow it", a)
		}
	}
	for a := range actions {
		if strings.HasPrefix(a, "ec2:") && !called[a] {
			t.Errorf("iam-policy.json allows %s, which the code never calls", a)
		}
	}
	// The agents' statements are exactly what an agent calls.
	for _, a := range []string{"ec2:DescribeInstances", "ec2:DescribeFleets", "ec2:DescribeFleetInstances", "ec2:ModifyFleet", "ec2:TerminateInstances"} {
		if !strings.HasPrefix(actions[a], "Agent") {
			t.Errorf("%s is in statement %q, want an Agent statement", a, actions[a])
		}
	}
	for _, a := range []string{"ec2:CreateFleet", "ec2:CreateLaunchTemplate", "ec2:RunInstances", "iam:PassRole"} {
		if !strings.HasPrefix(actions[a], "Launch") {
			t.Errorf("%s is in statement %q, want a Launch statement", a, actions[a])
		}
	}
}

func TestIAMPolicyConditions(t *testing.T) {
	actions, doc := policyActions(t)
	cond := map[string]string{}
	for _, s := range doc.Statement {
		for op, kv := range s.Condition {
			for k := range kv {
				cond[s.Sid] += op + ":" + k + " "
			}
		}
	}
	for action, want := range map[string]string{
		"ec2:ModifyFleet":          "aws:ResourceTag/" + ClusterTagKey,
		"ec2:TerminateInstances":   "aws:ResourceTag/" + ClusterTagKey,
		"ec2:CreateLaunchTemplate": "aws:RequestTag/" + ClusterTagKey,
		"ec2:CreateTags":           "ec2:CreateAction",
		"iam:PassRole":             "iam:PassedToService",
	} {
		if !strings.Contains(cond[actions[action]], want) {
			t.Errorf("%s (statement %s) is not conditioned on %s: %q", action, actions[action], want, cond[actions[action]])
		}
	}
}
