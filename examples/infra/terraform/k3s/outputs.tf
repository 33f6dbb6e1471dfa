output "instance_id" {
  description = "The master's instance id (the action's instance-id input, if you prefer it to discovery by tag)."
  value       = aws_instance.k3s_master.id
}

output "name_tag" {
  description = "The Name tag the action's default instance-tag (*k3s-master*) matches."
  value       = aws_instance.k3s_master.tags["Name"]
}

output "ssm_document_name" {
  description = "The SSM Command document to give the action as its ssm-document input (with examples/iam/deploy-role-policy-custom-document.json)."
  value       = aws_ssm_document.k3s_deploy.name
}

output "deploy_target_tag" {
  description = "The tag the custom-document deploy role policy requires on the master: the action's instance-tag-key and instance-tag with that policy."
  value       = local.deploy_target_tag
}

output "private_ip" {
  description = "The master's private IP address."
  value       = aws_instance.k3s_master.private_ip
}

output "instance_role_arn" {
  description = "The master's instance role: SSM core plus read access to the staged files."
  value       = aws_iam_role.k3s_master.arn
}

output "security_group_id" {
  description = "The master's security group (no inbound rules)."
  value       = aws_security_group.k3s_master.id
}
