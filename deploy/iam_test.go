package deploy

import (
	"encoding/json"
	"errors"
	"reflect"
	"strings"
	"testing"

	"github.com/aws/aws-sdk-go-v2/service/ec2"
)

// parsedPolicy reads a rendered policy back from its JSON, as IAM would,
// refusing unknown fields.
type parsedPolicy struct {
	Version   string
	Statement []struct {
		Sid       string
		Effect    string
		Action    []string
		Resource  []string
		Condition map[string]map[string][]string
	}
}

func renderParse(t *testing.T, doc PolicyDocument) parsedPolicy {
	t.Helper()
	var p parsedPolicy
	dec := json.NewDecoder(strings.NewReader(doc.JSON()))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&p); err != nil {
		t.Fatalf("not a valid policy document: %v\n%s", err, doc.JSON())
	}
	if p.Version != "2012-10-17" {
		t.Fatalf("version %q", p.Version)
	}
	sids := map[string]bool{}
	for _, s := range p.Statement {
		if s.Sid == "" || sids[s.Sid] || s.Effect != "Allow" || len(s.Action) == 0 || len(s.Resource) == 0 {
			t.Fatalf("malformed statement %+v", s)
		}
		sids[s.Sid] = true
	}
	return p
}

// readOnly are the actions that change nothing; every other action is
// mutating and must be scoped.
func readOnly(action string) bool {
	for _, p := range []string{"ec2:Describe", "ssm:GetParameter", "secretsmanager:GetSecretValue"} {
		if strings.HasPrefix(action, p) {
			return true
		}
	}
	return false
}

// referencedTypes are resources a launch only names (it creates or changes
// none of them), scoped by type.
var referencedTypes = []string{":subnet/*", ":security-group/*", ":network-interface/*", ":key-pair/*", "::image/*"}

// checkScoped asserts the rule of the policies: no wildcard action, no "*"
// resource for a mutating action, and every mutating statement either
// conditioned on this cluster's tag, pinned to one named role, or limited to
// resource types a launch only references.
func checkScoped(t *testing.T, name string, p parsedPolicy, cluster, role string) map[string][]string {
	t.Helper()
	actions := map[string][]string{} // action → Sids
	for _, s := range p.Statement {
		mutating := false
		for _, a := range s.Action {
			if strings.Contains(a, "*") {
				t.Errorf("%s %s: wildcard action %q", name, s.Sid, a)
			}
			actions[a] = append(actions[a], s.Sid)
			mutating = mutating || !readOnly(a)
		}
		if !mutating {
			continue
		}
		for _, r := range s.Resource {
			if r == "*" || strings.HasSuffix(r, ":*") {
				t.Errorf("%s %s: mutating statement on resource %q", name, s.Sid, r)
			}
		}
		tagged := false
		for op, kv := range s.Condition {
			for k, v := range kv {
				if op == "StringEquals" && (k == "aws:ResourceTag/"+ClusterTagKey || k == "aws:RequestTag/"+ClusterTagKey) {
					if !reflect.DeepEqual(v, []string{cluster}) {
						t.Errorf("%s %s: %s = %v, want exactly [%s]", name, s.Sid, k, v, cluster)
					}
					tagged = true
				}
			}
		}
		switch {
		case tagged:
		case reflect.DeepEqual(s.Action, []string{"iam:PassRole"}):
			if want := "arn:aws:iam::*:role/" + role; !reflect.DeepEqual(s.Resource, []string{want}) {
				t.Errorf("%s %s: PassRole on %v, want only %s", name, s.Sid, s.Resource, want)
			}
			if got := s.Condition["StringEquals"]["iam:PassedToService"]; !reflect.DeepEqual(got, []string{"ec2.amazonaws.com"}) {
				t.Errorf("%s %s: PassRole not limited to EC2: %v", name, s.Sid, s.Condition)
			}
		case reflect.DeepEqual(s.Action, []string{"iam:CreateServiceLinkedRole"}):
			if len(s.Condition["StringEquals"]["iam:AWSServiceName"]) == 0 {
				t.Errorf("%s %s: service-linked roles not limited by service", name, s.Sid)
			}
			for _, r := range s.Resource {
				if !strings.Contains(r, ":role/aws-service-role/") {
					t.Errorf("%s %s: resource %q is not a service-linked role", name, s.Sid, r)
				}
			}
		default:
			for _, r := range s.Resource {
				ok := false
				for _, ty := range referencedTypes {
					ok = ok || strings.HasSuffix(r, ty)
				}
				if !ok {
					t.Errorf("%s %s: mutating statement on %q without a %s condition", name, s.Sid, r, ClusterTagKey)
				}
			}
		}
	}
	return actions
}

func TestIAMPoliciesScopedToCluster(t *testing.T) {
	c := IAMPolicyConfig{Cluster: "prod", Role: "gpumesh-agent", Scale: true}
	agent := renderParse(t, mustPolicy(t, AgentPolicy, c))
	launcher := renderParse(t, mustPolicy(t, LauncherPolicy, c))
	aa := checkScoped(t, "agent", agent, "prod", "gpumesh-agent")
	la := checkScoped(t, "launcher", launcher, "prod", "gpumesh-agent")

	// The agent creates nothing and passes no role.
	for _, a := range []string{"ec2:RunInstances", "ec2:CreateFleet", "ec2:CreateLaunchTemplate", "ec2:CreateTags", "iam:PassRole"} {
		if len(aa[a]) > 0 {
			t.Errorf("agent policy allows %s (%v)", a, aa[a])
		}
	}
	// Without --scale the agent may not change the fleet or terminate.
	c.Scale = false
	plain := checkScoped(t, "agent", renderParse(t, mustPolicy(t, AgentPolicy, c)), "prod", "gpumesh-agent")
	for _, a := range []string{"ec2:ModifyFleet", "ec2:TerminateInstances"} {
		if len(plain[a]) > 0 {
			t.Errorf("agent policy without Scale allows %s", a)
		}
	}
	// Secrets: only under this cluster's path.
	for _, s := range agent.Statement {
		if s.Sid == "ReadThisClustersBootSecrets" {
			for _, r := range s.Resource {
				if !strings.Contains(r, "gpumesh/prod/") {
					t.Errorf("secrets resource %q not under gpumesh/prod/", r)
				}
			}
		}
	}
	for _, a := range []string{"ec2:CreateFleet", "ec2:RunInstances", "ec2:CreateLaunchTemplate", "ec2:CreateTags", "iam:PassRole", "ec2:ModifyFleet", "ec2:TerminateInstances"} {
		if len(la[a]) == 0 {
			t.Errorf("launcher policy lacks %s", a)
		}
	}
}

// Every EC2 API the code calls is in a policy: the interfaces below list
// exactly the methods the package calls on the EC2 client.
func TestIAMPoliciesCoverEveryCall(t *testing.T) {
	c := IAMPolicyConfig{Cluster: "prod", Role: "gpumesh-agent", Scale: true}
	allowed := map[string]bool{}
	for _, d := range []PolicyDocument{mustPolicy(t, AgentPolicy, c), mustPolicy(t, LauncherPolicy, c)} {
		for _, s := range d.Statement {
			for _, a := range s.Action {
				allowed[a] = true
			}
		}
	}
	called := map[string]bool{"ec2:RunInstances": true, "ec2:CreateTags": true, "iam:PassRole": true}
	for _, it := range []reflect.Type{
		reflect.TypeOf((*LaunchAPI)(nil)).Elem(),
		reflect.TypeOf((*FleetAPI)(nil)).Elem(),
		reflect.TypeOf((*ec2.DescribeInstancesAPIClient)(nil)).Elem(),
	} {
		for i := 0; i < it.NumMethod(); i++ {
			called["ec2:"+it.Method(i).Name] = true
		}
	}
	for a := range called {
		if !allowed[a] {
			t.Errorf("the code calls %s but no policy allows it", a)
		}
	}
	for a := range allowed {
		if strings.HasPrefix(a, "ec2:") && !called[a] {
			t.Errorf("a policy allows %s, which the code never calls", a)
		}
	}
}

func TestIAMPolicyValidate(t *testing.T) {
	for name, c := range map[string]IAMPolicyConfig{
		"no cluster":        {Role: "r"},
		"wildcard cluster":  {Cluster: "*", Role: "r"},
		"wildcard role":     {Cluster: "prod", Role: "gpumesh-*"},
		"bad account":       {Cluster: "prod", Role: "r", Account: "12"},
		"bad secrets path":  {Cluster: "prod", Role: "r", SecretsPath: "/a/../b/"},
		"launcher, no role": {Cluster: "prod"},
	} {
		_, err := LauncherPolicy(c)
		if !errors.Is(err, ErrInvalidConfig) {
			t.Errorf("%s: err = %v, want ErrInvalidConfig", name, err)
		}
	}
	d := mustPolicy(t, LauncherPolicy, IAMPolicyConfig{Cluster: "prod", Role: "gpumesh-agent", Account: "123456789012"})
	if !strings.Contains(d.JSON(), `"arn:aws:iam::123456789012:role/gpumesh-agent"`) {
		t.Fatalf("account not in the role ARN:\n%s", d.JSON())
	}
}

func mustPolicy(t *testing.T, render func(IAMPolicyConfig) (PolicyDocument, error), c IAMPolicyConfig) PolicyDocument {
	t.Helper()
	d, err := render(c)
	if err != nil {
		t.Fatal(err)
	}
	return d
}
